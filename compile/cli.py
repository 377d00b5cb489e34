"""The ``nnx-metal`` command: build, run, inspect and benchmark artifacts.

  nnx-metal build nnx_models:MLP --args 2,16,5 --input 8x2xf32 --target metal --out build/mlp
  nnx-metal run build/mlp --function eval --input 8x2xf32=0.5
  nnx-metal inspect build/mlp --html build/mlp/report.html
  nnx-metal bench --models mlp

A user mistake is one line on stderr with a hint and exit status 2, never a traceback.
"""

import argparse
import importlib
import json
import pathlib
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from ._errors import NnxMetalError
from ._hazards import find_races
from ._targets import TARGET_NAMES
from .runtime import Artifact, Program

# Element type suffixes of --input, as iree-run-module spells them.
_DTYPES = {
  "f16": "float16",
  "bf16": "bfloat16",
  "f32": "float32",
  "f64": "float64",
  "i1": "bool",
  "i8": "int8",
  "i16": "int16",
  "i32": "int32",
  "i64": "int64",
  "u8": "uint8",
  "u16": "uint16",
  "u32": "uint32",
  "u64": "uint64",
}


class UsageError(Exception):
  """A mistake on the command line, reported as one line with a hint."""


def parse_shape(spec: str) -> tuple[tuple[int, ...], str]:
  """``3x2xf32`` -> ``((3, 2), "float32")``; ``f32`` is a scalar."""
  *dims, element = spec.split("x")
  if element not in _DTYPES:
    raise UsageError(f"--input {spec!r}: unknown element type {element!r}; use one of {', '.join(_DTYPES)}")
  try:
    shape = tuple(int(d) for d in dims)
  except ValueError:
    raise UsageError(f"--input {spec!r}: dimensions must be integers, as in 3x2xf32") from None
  return shape, _DTYPES[element]


def parse_value(spec: str) -> np.ndarray:
  """``3x2xf32=0.5`` (filled), ``@x.npy`` (loaded) or ``3x2xf32`` (zeros) -> an array."""
  if spec.startswith("@"):
    try:
      return np.load(spec[1:])
    except OSError as e:
      raise UsageError(f"--input {spec!r}: cannot read {spec[1:]} ({e.strerror})") from None
  shape_spec, _, fill = spec.partition("=")
  shape, dtype = parse_shape(shape_spec)
  try:
    return np.full(shape, float(fill) if fill else 0, dtype=dtype)
  except ValueError:
    raise UsageError(f"--input {spec!r}: the fill value {fill!r} is not a number") from None


def load_factory(reference: str):
  """``package.module:factory`` -> the callable."""
  module_name, _, attribute = reference.partition(":")
  if not module_name or not attribute:
    raise UsageError(f"{reference!r} is not module:factory, e.g. nnx_models:MLP")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise UsageError(f"cannot import {module_name!r} ({e}); is it installed or on PYTHONPATH?") from None
  factory = getattr(module, attribute, None)
  if not callable(factory):
    raise UsageError(f"{module_name} has no callable {attribute!r}")
  return factory


def _parse_literal(text: str):
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


@contextmanager
def progress(message: str) -> Iterator[None]:
  """Prints ``message``, then the elapsed seconds every few seconds until the block ends."""
  print(f"{message} ...", file=sys.stderr, flush=True)
  done, start = threading.Event(), time.perf_counter()

  def tick():
    while not done.wait(5.0):
      print(f"  ... {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

  thread = threading.Thread(target=tick, daemon=True)
  thread.start()
  try:
    yield
  finally:
    done.set()
    thread.join()
    print(f"  done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def build(options: argparse.Namespace) -> int:
  import jax
  from flax import nnx

  from ._export import export, method

  factory = load_factory(options.factory)
  args = [_parse_literal(a) for a in options.args.split(",")] if options.args else []
  rngs_kwargs = {"rngs": nnx.Rngs(options.seed)} if not options.no_rngs else {}
  try:
    model = factory(*args, **rngs_kwargs)
  except TypeError as e:
    raise UsageError(f"{options.factory}({options.args or ''}) failed: {e}; check --args and --no-rngs") from None
  if not isinstance(model, nnx.Module):
    raise UsageError(f"{options.factory} returned a {type(model).__name__}, not an nnx.Module")
  inputs = [jax.ShapeDtypeStruct(*parse_shape(spec)) for spec in options.input]
  modes = ["train", "eval"] if options.mode == "both" else [options.mode]
  functions = {mode: method(options.method, *inputs, mode=mode) for mode in modes}
  with progress(f"lowering and compiling {type(model).__name__}.{options.method} for {options.target}"):
    artifact = export(model, functions, target=options.target, cache=not options.no_cache)
  artifact.save(options.out)
  for name, spec in artifact.functions.items():
    print(f"{name}: {spec.dispatch_count} dispatches")
  print(f"wrote {options.out}{' (compiled module from the cache)' if artifact.from_cache else ''}")
  return 0


def run(options: argparse.Namespace) -> int:
  artifact = Artifact.open(options.artifact)
  if options.function not in artifact.functions:
    raise UsageError(f"{options.artifact} has no function {options.function!r}; it has {', '.join(artifact.functions)}")
  program = Program(artifact, device=options.device)
  outputs = program.functions[options.function](*[parse_value(spec) for spec in options.input])
  leaves = outputs if isinstance(outputs, (tuple, list)) else [outputs]
  for index, leaf in enumerate(leaves):
    array = np.asarray(leaf)
    print(f"result[{index}]: {array.dtype}{list(array.shape)}")
    print(np.array2string(array, threshold=20, precision=5))
  if options.output:
    np.save(options.output, np.asarray(leaves[0]))
  return 0


def inspect(options: argparse.Namespace) -> int:
  artifact = Artifact.open(options.artifact)
  manifest = artifact.manifest
  if options.html:
    from ._report import write_report

    with progress(f"writing the report of {options.artifact}"):
      write_report(artifact, options.html)
    print(f"wrote {options.html}")
    return 0
  if options.json:
    print(manifest.to_json(), end="")
    return 0
  print(f"{manifest.model} for {manifest.target.name} (iree {manifest.versions.get('iree-base-compiler', '?')})")
  print(f"SPIR-V race check: {manifest.hazard_check}")
  print("functions:")
  for name, spec in artifact.functions.items():
    print(f"  {spec.signature()}: {spec.dispatch_count} dispatches, updates {len(spec.updates)}")
  print("state:")
  for variable in artifact.state:
    print(f"  {variable.name:<40} {variable.variable_type:<12} {variable.dtype}{list(variable.shape)}")
  return 0


def check(options: argparse.Namespace) -> int:
  """Re-checks the SPIR-V kernels an artifact ships for data races (exit 1 if any)."""
  artifact = Artifact.open(options.artifact)
  kernels = artifact.spirv()
  if not kernels:
    print(f"{options.artifact} holds no SPIR-V kernels (target {artifact.target}): nothing to check")
    return 0
  racy = {name: races for name, data in kernels.items() if (races := find_races(data))}
  for name, races in racy.items():
    for race in races:
      print(f"{name}: {race.describe()}")
  print(f"{len(kernels)} kernels checked, {len(racy)} may race")
  return 1 if racy else 0


def bench(options: argparse.Namespace) -> int:
  from . import bench as benchmarks

  argv = ["--out", str(options.out), "--rounds", str(options.rounds), "--calls", str(options.calls)]
  return benchmarks.main(argv + (["--models", *options.models] if options.models else []))


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="nnx-metal", description="Compile Flax NNX models with IREE and run them.")
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  p = commands.add_parser(
    "build",
    help="export a model as an artifact directory",
    description="Export model.<method> of the NNX module that FACTORY builds, for a target, as an artifact "
    "directory (manifest.json, module.vmfb, params.irpa, module.mlir, msl/ for metal).",
  )
  p.add_argument("factory", help="module:callable returning an nnx.Module, e.g. nnx_models:MLP")
  p.add_argument("--args", default="", help="comma-separated positional arguments for FACTORY, e.g. 2,16,5")
  p.add_argument("--no-rngs", action="store_true", help="do not pass rngs=nnx.Rngs(SEED) to FACTORY")
  p.add_argument("--seed", type=int, default=0, help="seed of the rngs passed to FACTORY (default 0)")
  p.add_argument("--input", action="append", default=[], metavar="SHAPE", help="an input shape, e.g. 8x2xf32; repeat")
  p.add_argument("--method", default="__call__", help="the method to export (default __call__)")
  p.add_argument("--mode", choices=["train", "eval", "both"], default="both", help="NNX mode(s), one function each")
  p.add_argument("--target", default="metal", choices=TARGET_NAMES, help="default metal")
  p.add_argument("--out", type=pathlib.Path, required=True, help="the artifact directory to write")
  p.add_argument("--no-cache", action="store_true", help="always run iree-compile")
  p.set_defaults(handler=build)

  p = commands.add_parser(
    "run", help="run a function of an artifact", description="Run one function of an artifact on given inputs."
  )
  p.add_argument("artifact", type=pathlib.Path)
  p.add_argument("--function", required=True, help="the function to run (see `nnx-metal inspect`)")
  p.add_argument("--input", action="append", default=[], help="8x2xf32=0.5 (filled), 8x2xf32 (zeros) or @x.npy; repeat")
  p.add_argument("--device", help="IREE driver (default: the target's first, e.g. local-sync)")
  p.add_argument("--output", type=pathlib.Path, help="save the first result as .npy")
  p.set_defaults(handler=run)

  p = commands.add_parser(
    "inspect", help="describe an artifact", description="Print an artifact's functions, dispatches and state."
  )
  p.add_argument("artifact", type=pathlib.Path)
  p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
  p.add_argument(
    "--html", type=pathlib.Path, help="write the HTML report (treescope state, functions, MSL) to this file"
  )
  p.set_defaults(handler=inspect)

  p = commands.add_parser(
    "check",
    help="re-check an artifact's SPIR-V kernels for data races",
    description="Look for loads of workgroup or storage-buffer memory that another invocation stored to with no "
    "barrier in between, in every SPIR-V kernel an artifact ships (spirv/). Exit status 1 if any may race.",
  )
  p.add_argument("artifact", type=pathlib.Path)
  p.set_defaults(handler=check)

  p = commands.add_parser(
    "bench",
    help="run the benchmarks",
    description="Benchmark programs against jax.jit and nnx.jit (what `nox -s bench` runs); writes bench.json "
    "and bench.md.",
  )
  p.add_argument("--out", default="build/bench", help="output directory (default build/bench)")
  p.add_argument("--models", nargs="*", help="zoo models (default: all)")
  p.add_argument("--rounds", type=int, default=7, help="interleaved rounds after warm-up (default 7)")
  p.add_argument("--calls", type=int, default=30, help="calls per round (default 30)")
  p.set_defaults(handler=bench)
  return parser


def main(argv: list[str] | None = None) -> int:
  options = make_parser().parse_args(argv)
  try:
    return options.handler(options)
  except UsageError as e:
    print(f"nnx-metal: error: {e}", file=sys.stderr)
  except NnxMetalError as e:
    first, *rest = str(e).splitlines()
    print(f"nnx-metal {options.command}: {type(e).__name__}: {first}", file=sys.stderr)
    if rest:  # compiler diagnostics: kept, but after the one-line summary
      print("\n".join(rest), file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main())
