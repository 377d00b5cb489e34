"""The realistic tier of ``nox -s bench``: models at the sizes people train and deploy, against XLA on the same CPU.

For each model of ``nnx_models.REALISTIC``, its forward pass (eval mode) and its train
step are exported for the ``cpu`` target and run on ``local-sync``, ``local-task`` and
the program's default driver, interleaved in one process with the same split-once
function under ``jax.jit``. Reported: median seconds per call and ratios, GFLOP/s
(XLA's cost analysis of the function) beside XLA's and numpy's matrix-product throughput
here, dispatches per call beside the kernels XLA compiles the same function into, and
the dispatches of the ``metal`` build (each one a kernel launch on an Apple GPU).
"""

import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from compile import call_with_objects, export, function
from nnx_models import REALISTIC

from .timing import interleaved

# HLO instructions that launch no work of their own.
_NOT_KERNELS = frozenset({"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all", "while"})


def xla_kernel_count(hlo: str) -> int:
  """Kernels in XLA's optimized HLO: the instructions of the entry computation and of loop bodies that do work.

  Fusions count once, like an IREE dispatch; parameters, constants, tuples and bitcasts do not.
  """
  loops = set(re.findall(r"(?:condition|body)=%([\w.\-]+)", hlo))
  count = 0
  for computation in hlo.split("\n\n"):
    lines = computation.strip().splitlines()
    header = re.match(r"(ENTRY )?%([\w.\-]+)", lines[0]) if lines else None
    if header and (header.group(1) or header.group(2) in loops):
      ops = (re.search(r"= \S+ ([a-z][\w-]*)\(", line) for line in lines[1:])
      count += sum(1 for op in ops if op and op.group(1) not in _NOT_KERNELS)
  return count


def _split_once(objects: Any, fn: Callable, args: tuple, *, updates: bool) -> tuple[Callable[[], Any], str]:
  """``fn`` on ``objects`` as a JAX user would run it: split once, jit the pure function; and its optimized HLO.

  A function that changes state (a train step) returns the new state too; one that
  does not (a forward pass in eval mode) returns its outputs only, as inference code does.
  """
  keys = tuple(objects) if isinstance(objects, dict) else None
  graphdef, state = nnx.split(objects)

  @jax.jit
  def pure(state, *args):
    merged = nnx.merge(graphdef, state)
    outputs = call_with_objects(merged, fn, args, keys)
    return (outputs, nnx.state(merged)) if updates else outputs

  cell = [state]

  def call():
    if not updates:
      return jax.block_until_ready(pure(cell[0], *args))
    outputs, cell[0] = pure(cell[0], *args)
    return jax.block_until_ready(outputs)

  return call, pure.lower(state, *args).compile().as_text()


def matmul_gflops(size: int = 1024, repeats: int = 20) -> dict[str, float]:
  """GFLOP/s of a float32 ``size`` x ``size`` matrix product here: numpy (BLAS) and XLA."""
  a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
  jitted = jax.jit(jnp.matmul)
  x = jnp.asarray(a)
  results = {}
  for name, call in {"numpy": lambda: a @ a, "XLA": lambda: jitted(x, x).block_until_ready()}.items():
    call()
    start = time.perf_counter()
    for _ in range(repeats):
      call()
    results[name] = 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9
  return results


def run(*, rounds: int, calls: int, models: list[str]) -> list[dict]:
  """One row per model and function (see the module docstring)."""
  rows = []
  with jax.numpy_dtype_promotion("standard"):  # optax and Flax's layers are written for JAX's default promotion
    for name in models:
      entry = REALISTIC[name]
      functions = {fn_name: function(fn, *args) for fn_name, (fn, args) in entry.calls().items()}
      artifact = export(entry.objects(), functions, target="cpu")
      metal = export(entry.objects(), functions, target="metal")
      programs = {device: artifact.load(device=device) for device in ("local-sync", "local-task")}
      default = artifact.load()
      for fn_name, (fn, args) in entry.calls().items():
        host = [np.asarray(a) for a in args]
        updates = bool(artifact.functions[fn_name].updates)
        jax_call, hlo = _split_once(entry.objects(), fn, args, updates=updates)
        variants = {f"program {d}": (lambda f=p.functions[fn_name], host=host: f(*host)) for d, p in programs.items()}
        variants["jax.jit split-once"] = jax_call
        medians = interleaved(variants, rounds=rounds, calls=calls)
        flops = artifact.functions[fn_name].flops
        rows.append(
          {
            "model": name,
            "function": fn_name,
            "seconds": medians,
            "default device": default.driver,
            "gflops": {variant: flops / seconds / 1e9 for variant, seconds in medians.items()},
            "dispatches": artifact.functions[fn_name].dispatch_count,
            "metal dispatches": metal.functions[fn_name].dispatch_count,
            "xla kernels": xla_kernel_count(hlo),
            "flops": flops,
          }
        )
        print(f"realistic {name} {fn_name}", flush=True)
  return rows


def markdown(rows: list[dict], matmul: dict[str, float]) -> list[str]:
  lines = [
    "## Realistic models (cpu target)",
    "",
    f"Matrix product 1024x1024 float32 on this machine: numpy {matmul['numpy']:.0f} GFLOP/s, "
    f"XLA {matmul['XLA']:.0f} GFLOP/s. Ratios are program / jax.jit (< 1: the program is faster); "
    "`default` is the driver `artifact.load()` picks.",
    "",
    "| model | function | sync ms | task ms | jax.jit ms | sync/jax | task/jax | default | GFLOP/s task (XLA) "
    "| dispatches cpu / metal | XLA kernels |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for row in rows:
    s, g = row["seconds"], row["gflops"]
    sync, task, xla = s["program local-sync"], s["program local-task"], s["jax.jit split-once"]
    lines.append(
      f"| {row['model']} | {row['function']} | {sync * 1e3:.1f} | {task * 1e3:.1f} | {xla * 1e3:.1f} | "
      f"{sync / xla:.2f} | {task / xla:.2f} | {row['default device']} | "
      f"{g['program local-task']:.0f} ({g['jax.jit split-once']:.0f}) | "
      f"{row['dispatches']} / {row['metal dispatches']} | {row['xla kernels']} |"
    )
  return lines
