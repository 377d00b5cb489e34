"""`nox -s bench`: programs against XLA and nnx.jit, side by side in one process; writes JSON and Markdown.

Run as ``python -m nnx_models.tools.bench --out build/bench``. Every comparison is
interleaved (round-robin over the variants, after warm-up) and reported as the
median per-call time and as ratios. A benchmark, not a test: nothing here asserts.
"""

import argparse
import dataclasses
import json
import pathlib
import sys
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from iree import runtime as rt

from compile import CompileCache, export, function, method
from nnx_models import REALISTIC, ZOO

from . import bench_c, bench_dynamic, bench_llm, bench_realistic
from .timing import interleaved

# Tiers beside the zoo and the realistic models: the C library (issue 15), dynamic against static
# shapes (issue 17), the GPT-2-size language model (issue 18, minutes: only when asked for).
TIERS = ("c", "dynamic", "llm")
DEFAULT_TIERS = ("c", "dynamic")

BATCHES = (1, 32, 256)
TRAINED = ("mlp", "stacked_mlp", "linear_regression")  # zoo models with a benchmarked train step


def _ready(tree):
  return jax.block_until_ready(tree)


def _forward_variants(name: str, batch: int, cache: CompileCache) -> tuple[dict[str, Callable], dict]:
  entry = ZOO[name]
  args = entry.example_args(batch, 0)
  artifact = export(entry.make(0), {"eval": method("__call__", *args, mode="eval")}, cache=cache)
  sync, task = artifact.load(device="local-sync"), artifact.load(device="local-task")
  host_args = [np.asarray(a) for a in args]

  model = entry.make(0)
  model.eval()
  graphdef, state = nnx.split(model)

  @jax.jit
  def split_once(state, *args):  # the split-once pure function, as a JAX user would write it
    model = nnx.merge(graphdef, state)
    return model(*args), nnx.state(model)

  jitted_model = entry.make(0)
  jitted_model.eval()
  nnx_jitted = nnx.jit(lambda model, *args: model(*args))

  raw = _raw_invoke(sync, "eval", host_args)
  variants = {
    "program local-sync": lambda: sync.eval(*host_args),
    "program local-task": lambda: task.eval(*host_args),
    "raw invoke local-sync": raw,
    "jax.jit split-once": lambda: _ready(split_once(state, *args)),
    "nnx.jit": lambda: _ready(nnx_jitted(jitted_model, *args)),
  }
  return variants, {"dispatches": artifact.functions["eval"].dispatch_count}


def _raw_invoke(program, name: str, host_args: list[np.ndarray]) -> Callable[[], object]:
  """The same function called through iree.runtime directly: inputs copied in, outputs mapped out."""
  module = program._module
  vm_function, context, device = module.function(name), module._context.vm_context, module.device

  def call():
    args = rt.VmVariantList(len(host_args))
    for array in host_args:
      args.push_ref(
        device.allocator.allocate_buffer_copy(
          memory_type=int(rt.MemoryType.DEVICE_LOCAL),
          allowed_usage=int(rt.BufferUsage.DEFAULT),
          device=device,
          buffer=array,
          element_type=rt.array_interop.map_dtype_to_element_type(array.dtype),
        )
      )
    results = rt.VmVariantList(1)
    context.invoke(vm_function, args, results)
    views = [results.get_as_object(i, rt.HalBufferView) for i in range(results.size)]
    return [np.array(view.map().asarray(tuple(view.shape), np.dtype(np.float32))) for view in views]

  return call


def _train_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(lambda model: jnp.mean((model(x) - y) ** 2))(model)
  optimizer.update(model, grads)
  return loss


def _train_objects(name: str) -> dict:
  model = ZOO[name].make(0)
  return {"model": model, "optimizer": nnx.Optimizer(model, optax.sgd(1e-3), wrt=nnx.Param)}


def _train_variants(name: str, batch: int, cache: CompileCache) -> tuple[dict[str, Callable], dict]:
  (x,) = ZOO[name].example_args(batch, 0)
  y = jnp.zeros_like(ZOO[name].make(0)(x))
  artifact = export(_train_objects(name), {"train_step": function(_train_step, x, y)}, cache=cache)
  program = artifact.load(device="local-sync")
  host = (np.asarray(x), np.asarray(y))

  # The same step with the whole State passed in and out on every call (Program.functional).
  in_out = artifact.load(device="local-sync").functional("train_step")
  in_out_state = [nnx.state(_train_objects(name))]

  def in_out_step():
    loss, in_out_state[0] = in_out(in_out_state[0], *host)
    return loss

  jit_objects = _train_objects(name)
  graphdef2, state2 = nnx.split(jit_objects)
  jit_state = [state2]

  @jax.jit
  def split_once(state, x, y):
    objects = nnx.merge(graphdef2, state)
    loss = _train_step(*objects.values(), x, y)
    return loss, nnx.state(objects)

  def jax_step():
    loss, jit_state[0] = split_once(jit_state[0], x, y)
    return _ready(loss)

  nnx_objects = _train_objects(name)
  nnx_step = nnx.jit(_train_step)
  variants = {
    "program local-sync": lambda: program.train_step(*host),
    "state in/out local-sync": in_out_step,
    "jax.jit split-once": jax_step,
    "nnx.jit": lambda: _ready(nnx_step(*nnx_objects.values(), x, y)),
  }
  return variants, {"dispatches": artifact.functions["train_step"].dispatch_count}


def _compile_times(name: str, cache_dir: pathlib.Path) -> dict[str, float]:
  entry = ZOO[name]
  args = entry.example_args(32, 0)
  functions = {mode: method("__call__", *args, mode=mode) for mode in ("train", "eval")}
  times = {}
  for target in ("cpu", "vulkan", "metal"):
    artifact = export(entry.make(0), functions, target=target, cache=False)
    times[f"iree-compile {target}"] = artifact.manifest.compile_seconds
  cache = CompileCache(cache_dir)
  export(entry.make(0), functions, cache=cache)
  start = time.perf_counter()
  artifact = export(entry.make(0), functions, cache=cache)
  times["cached re-export"] = time.perf_counter() - start
  assert artifact.from_cache
  xla = 0.0
  for mode in ("train", "eval"):
    model = entry.make(0)
    getattr(model, mode)()
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, *a, graphdef=graphdef: nnx.merge(graphdef, state)(*a))
    start = time.perf_counter()
    fn.lower(state, *args).compile()
    xla += time.perf_counter() - start
  times["XLA compile cpu"] = xla
  return times


@dataclasses.dataclass
class Report:
  forward: list = dataclasses.field(default_factory=list)
  train: list = dataclasses.field(default_factory=list)
  compile: list = dataclasses.field(default_factory=list)
  realistic: list = dataclasses.field(default_factory=list)
  matmul_gflops: dict = dataclasses.field(default_factory=dict)


def _row(name, batch, medians, extra):
  return {"model": name, "batch": batch, "seconds": medians, **extra}


def run(rounds: int, calls: int, models: list[str], realistic: list[str]) -> Report:
  report = Report()
  if realistic:
    report.matmul_gflops = bench_realistic.matmul_gflops()
    report.realistic = bench_realistic.run(rounds=rounds, calls=max(1, calls // 10), models=realistic)
  with tempfile.TemporaryDirectory(prefix="nnx-metal-bench-") as tmp:
    cache = CompileCache(pathlib.Path(tmp) / "cache")
    for name in models:
      batches = (1,) if name == "counter" else BATCHES  # the counter takes no input
      for batch in batches:
        variants, extra = _forward_variants(name, batch, cache)
        # The wrapper's overhead is timed as its own pair: interleaving it with JAX's
        # much heavier calls adds cache noise larger than the few microseconds measured.
        raw = "raw invoke local-sync"
        medians = interleaved({k: v for k, v in variants.items() if k != raw}, rounds=rounds, calls=calls)
        pair = interleaved({"program": variants["program local-sync"], raw: variants[raw]}, rounds=rounds, calls=calls)
        extra["wrapper overhead"] = pair["program"] / pair[raw]
        report.forward.append(_row(name, batch, {**medians, raw: pair[raw]}, extra))
        print(f"forward {name} batch {batch}", file=sys.stderr)
        if name in TRAINED:
          variants, extra = _train_variants(name, batch, cache)
          report.train.append(_row(name, batch, interleaved(variants, rounds=rounds, calls=calls), extra))
      report.compile.append({"model": name, "seconds": _compile_times(name, pathlib.Path(tmp) / "recompile")})
  return report


def _ratio(row, a, b) -> str:
  return f"{row['seconds'][a] / row['seconds'][b]:.2f}"


def _us(seconds: float) -> str:
  return f"{seconds * 1e6:.0f}"


def markdown(report: Report) -> str:
  lines = [
    "# nnx-metal benchmarks",
    "",
    "Median per call, interleaved after warm-up, one process. Ratios < 1: the program is faster.",
    "",
  ]
  lines += [
    "## Forward (eval mode)",
    "",
    "| model | batch | program sync µs | task µs | raw invoke µs | jax.jit µs | nnx.jit µs "
    "| program/jax.jit | program/nnx.jit | program/raw (own pair) | dispatches |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for row in report.forward:
    s = row["seconds"]
    lines.append(
      f"| {row['model']} | {row['batch']} | {_us(s['program local-sync'])} | {_us(s['program local-task'])} | "
      f"{_us(s['raw invoke local-sync'])} | {_us(s['jax.jit split-once'])} | {_us(s['nnx.jit'])} | "
      f"{_ratio(row, 'program local-sync', 'jax.jit split-once')} | {_ratio(row, 'program local-sync', 'nnx.jit')} | "
      f"{row['wrapper overhead']:.2f} | {row['dispatches']} |"
    )
  lines += [
    "",
    "## Train step (SGD)",
    "",
    "| model | batch | program µs | state in/out µs | jax.jit µs | nnx.jit µs "
    "| program/in-out | program/jax.jit | program/nnx.jit | dispatches |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for row in report.train:
    s = row["seconds"]
    program = "program local-sync"
    lines.append(
      f"| {row['model']} | {row['batch']} | {_us(s[program])} | {_us(s['state in/out local-sync'])} | "
      f"{_us(s['jax.jit split-once'])} | {_us(s['nnx.jit'])} | {_ratio(row, program, 'state in/out local-sync')} | "
      f"{_ratio(row, program, 'jax.jit split-once')} | {_ratio(row, program, 'nnx.jit')} | {row['dispatches']} |"
    )
  lines += [
    "",
    "## Compile (train + eval functions, batch 32)",
    "",
    "| model | iree cpu s | iree vulkan s | iree metal s | XLA cpu s | iree cpu / XLA | cached re-export s |",
    "|---|---|---|---|---|---|---|",
  ]
  for row in report.compile:
    s = row["seconds"]
    lines.append(
      f"| {row['model']} | {s['iree-compile cpu']:.2f} | {s['iree-compile vulkan']:.2f} | "
      f"{s['iree-compile metal']:.2f} | {s['XLA compile cpu']:.2f} | "
      f"{s['iree-compile cpu'] / s['XLA compile cpu']:.1f} | {s['cached re-export']:.3f} |"
    )
  if report.realistic:
    lines += ["", *bench_realistic.markdown(report.realistic, report.matmul_gflops)]
  return "\n".join(lines) + "\n"


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"{value} is less than 1")
  return value


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m nnx_models.tools.bench", description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("build/bench"))
  parser.add_argument("--rounds", type=_positive_int, default=7, help="interleaved rounds after warm-up (default 7)")
  parser.add_argument("--calls", type=_positive_int, default=30, help="calls per round (default 30)")
  parser.add_argument("--models", nargs="*", help="zoo models (small: call overhead; default all)")
  parser.add_argument(
    "--realistic",
    nargs="*",
    help="realistic models (throughput; default: all, or none when --models is given; `--realistic` alone: none)",
  )
  parser.add_argument(
    "--tiers",
    nargs="*",
    choices=TIERS,
    help=f"more tiers (default: {' '.join(DEFAULT_TIERS)}, or none when --models is given; llm only when named)",
  )
  parser.add_argument("--llm", action="store_true", help="add the language-model tier (GPT-2 small, full size)")
  parser.add_argument("--llm-quick", action="store_true", help="the language-model tier at its tiny size")
  options = parser.parse_args(argv)
  for flag, chosen, known in (("--models", options.models, ZOO), ("--realistic", options.realistic, REALISTIC)):
    unknown = [name for name in chosen or () if name not in known]
    if unknown:
      parser.error(f"{flag}: unknown model(s) {', '.join(map(repr, unknown))}; choose from {', '.join(known)}")
  if options.out.exists() and not options.out.is_dir():
    parser.error(f"--out {str(options.out)!r} exists and is not a directory; choose another path")
  models = options.models if options.models is not None else list(ZOO)
  # Zoo models named alone are a quick run: the realistic tier then runs only if asked for.
  realistic = options.realistic if options.realistic is not None else ([] if options.models else list(REALISTIC))
  tiers = set(options.tiers if options.tiers is not None else ([] if options.models else DEFAULT_TIERS))
  tiers |= {"llm"} if options.llm or options.llm_quick else set()
  report = run(options.rounds, options.calls, models, realistic)
  options.out.mkdir(parents=True, exist_ok=True)
  results: dict = {**dataclasses.asdict(report)}
  table = markdown(report)
  if "c" in tiers:
    results["c"] = bench_c.run(options.out)
    table += "\n" + bench_c.markdown(results["c"])
  if "dynamic" in tiers:
    results["dynamic"] = bench_dynamic.run()
    table += "\n" + "\n".join(bench_dynamic.markdown(results["dynamic"])) + "\n"
  if "llm" in tiers:
    results["llm"] = bench_llm.run(options.out / "llm", quick=options.llm_quick)
    table += "\n" + bench_llm.markdown(results["llm"])
  (options.out / "bench.json").write_text(json.dumps(results, indent=1, default=str))
  (options.out / "bench.md").write_text(table)
  print(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
