"""Dynamic against static shapes for ``nox -s bench``: what a symbolic batch size costs per call.

One model (``nnx_models.MLP``, eval mode) is exported three ways for each target: once per
batch size with static shapes, once with a symbolic batch (``jax.export.symbolic_shape("b")``,
IREE's dynamic dimensions), and once as padded buckets (one static function per power of two).
Each is called at every batch size, interleaved in one process; reported are the median
milliseconds per call and the dynamic and bucketed programs' ratios to the static one.
"""

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import compile as nnxc
from compile.runtime import DeviceUnavailableError
from nnx_models import MLP

FEATURES, HIDDEN, CLASSES = 64, 512, 10
MAX_BATCH = 64
BUCKETS = (1, 8, 64)


def _model() -> nnx.Module:
  return MLP(FEATURES, HIDDEN, CLASSES, rngs=nnx.Rngs(0))


def _median_ms(call, x: np.ndarray, calls: int) -> float:
  call(x)  # warm: first-call allocations
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    call(x)
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def _programs(target: str, batches: tuple[int, ...]) -> dict[str, Any]:
  (batch,) = jax.export.symbolic_shape("b", constraints=(f"b <= {MAX_BATCH}",))
  symbolic = jax.ShapeDtypeStruct((batch, FEATURES), jnp.float32)
  static = {f"static_{n}": nnxc.method("__call__", jnp.zeros((n, FEATURES)), mode="eval") for n in batches}
  functions = {
    **static,
    "dynamic": nnxc.method("__call__", symbolic, mode="eval"),
    "bucketed": nnxc.method("__call__", symbolic, mode="eval", buckets=BUCKETS, pad=True),
  }
  return nnxc.export(_model(), functions, target=target).load()


def run(
  targets: tuple[str, ...] = ("cpu", "metal-vulkan"), batches: tuple[int, ...] = (1, 7, 32), calls: int = 50
) -> dict:
  """``{"rows": [{target, batch, static_ms, dynamic_ms, bucketed_ms, dynamic_ratio, bucketed_ratio}], ...}``."""
  rows, skipped = [], {}
  for target in targets:
    try:
      program = _programs(target, batches)
    except DeviceUnavailableError as e:
      skipped[target] = str(e)
      continue
    rng = np.random.default_rng(0)
    for n in batches:
      x = rng.standard_normal((n, FEATURES), dtype=np.float32)
      static = _median_ms(program.functions[f"static_{n}"], x, calls)
      dynamic = _median_ms(program.dynamic, x, calls)
      bucketed = _median_ms(program.bucketed, x, calls)
      rows.append(
        {
          "target": target,
          "batch": n,
          "static_ms": static,
          "dynamic_ms": dynamic,
          "bucketed_ms": bucketed,
          "dynamic_ratio": dynamic / static,
          "bucketed_ratio": bucketed / static,
        }
      )
  model = f"MLP({FEATURES}, {HIDDEN}, {CLASSES}) eval, b <= {MAX_BATCH}, buckets {BUCKETS} padded"
  return {"model": model, "calls": calls, "rows": rows, "skipped": skipped}


def markdown(result: dict) -> list[str]:
  """The table of :func:`run`'s result, for ``build/bench/bench.md``."""
  lines = [
    f"### Dynamic against static shapes: {result['model']}",
    "",
    f"Median ms per call over {result['calls']} calls (lower is better); ratios to the static function.",
    "",
    "| target | batch | static ms | dynamic ms | dynamic / static | bucketed ms | bucketed / static |",
    "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for row in result["rows"]:
    lines.append(
      f"| {row['target']} | {row['batch']} | {row['static_ms']:.3f} | {row['dynamic_ms']:.3f} | "
      f"{row['dynamic_ratio']:.2f}x | {row['bucketed_ms']:.3f} | {row['bucketed_ratio']:.2f}x |"
    )
  lines += [f"\n{target}: not run ({why})" for target, why in result["skipped"].items()]
  return lines


if __name__ == "__main__":
  print("\n".join(markdown(run())))
