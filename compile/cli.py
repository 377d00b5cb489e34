"""The ``nnx-metal`` command: build, run, inspect and check artifacts.

  nnx-metal build nnx_models:MLP --args 2,16,5 --input 8x2xf32 --target metal --out build/mlp
  nnx-metal run build/mlp --function eval --input 8x2xf32=0.5
  nnx-metal inspect build/mlp --html build/mlp/report.html

A user mistake is one line on stderr with a hint and exit status 2, never a traceback.
Mistakes are the command line's own (a malformed ``--input``, a missing file), the
user's code failing (the factory, its module, or the model rejecting the inputs),
or an error nnx-metal raises on purpose (:class:`compile.NnxMetalError`). Anything
else is a bug of nnx-metal and keeps its traceback.
"""

import argparse
import contextlib
import difflib
import errno
import importlib
import json
import os
import pathlib
import re
import stat
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from ._cli_inputs import UsageError, check_inputs, first_line, parse_input, parse_shape
from .runtime import TARGET_NAMES, Artifact, NnxMetalError, SignatureError, bucket_groups
from .spirv import find_races

# Manifest fields the module does not record, so only a pinned digest vouches for them.
UNAUTHENTICATED_FIELDS = ("model", "objects", "versions", "flags", "dispatches", "rewrites", "hazard_check")
# What a full disk, a quota or a file-size limit makes writes fail with: the machine's state, not a bug.
_NO_ROOM = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_DOTTED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _library_dirs() -> list[str]:
  dirs = [sysconfig.get_paths()["stdlib"], os.path.dirname(__file__)]
  for name in ("jax", "jaxlib", "flax", "numpy", "ml_dtypes", "treescope"):
    module = sys.modules.get(name)
    if module is not None and getattr(module, "__file__", None):
      dirs.append(os.path.dirname(module.__file__))
  return [os.path.realpath(d) + os.sep for d in dirs]


def _raised_at(error: BaseException) -> str:
  """`` (at file:line)``: the innermost frame of the user's code the exception passed through, or ""."""
  libraries, where = _library_dirs(), ""
  traceback = error.__traceback__
  while traceback is not None:
    file_name = traceback.tb_frame.f_code.co_filename
    if not file_name.startswith("<") and not os.path.realpath(file_name).startswith(tuple(libraries)):
      try:
        shown = os.path.relpath(file_name)
      except ValueError:  # another drive
        shown = file_name
      where = f" (at {shown if not shown.startswith('..') else file_name}:{traceback.tb_lineno})"
    traceback = traceback.tb_next
  return where


def _user_code_failed(error: Exception) -> str:
  """An exception of the user's code, as one line: type, message and where it was raised."""
  return f"{first_line(error)}{_raised_at(error)}"


# Files the user names


def _first_existing(path: pathlib.Path) -> pathlib.Path:
  path = path.absolute()
  while not os.path.lexists(path) and path != path.parent:
    path = path.parent
  return path


def _check_can_create(path: pathlib.Path, option: str, *, parent_must_exist: bool = False) -> None:
  """Fails early when ``path`` cannot be written: a folder on the way is a file or missing."""
  ancestor = _first_existing(path.parent)
  if not ancestor.is_dir():
    raise UsageError(f"{option} {str(path)!r}: {ancestor} is not a directory; choose another path")
  if parent_must_exist and ancestor != path.parent.absolute():
    raise UsageError(f"{option} {str(path)!r}: the directory {path.parent} does not exist; create it first")


def _concerns(error: OSError, where: pathlib.Path) -> bool:
  """Whether ``error`` is about ``where`` (a path the user gave), something in it, or a folder on the way."""
  if error.filename is None:
    return False
  failed, where = pathlib.Path(os.fsdecode(error.filename)).absolute(), where.absolute()
  return failed == where or where in failed.parents or failed in where.parents


def open_artifact(path: pathlib.Path, *, digest: str | None = None) -> Artifact:
  """``Artifact.open``, with a file system error about the directory as a usage error."""
  try:
    return Artifact.open(path, digest=digest)
  except OSError as e:
    if not _concerns(e, path):
      raise
    raise UsageError(f"cannot read the artifact {path} ({e.strerror or e}: {e.filename})") from None


# The user's factory and model


def load_factory(reference: str):
  """``package.module:factory`` (or ``module:Class.create``) -> the callable."""
  module_name, _, attribute = reference.partition(":")
  if not _DOTTED_NAME.fullmatch(module_name) or not _DOTTED_NAME.fullmatch(attribute):
    raise UsageError(f"FACTORY {reference!r} is not module:factory, e.g. nnx_models:MLP")
  if os.getcwd() not in sys.path and "" not in sys.path:
    # As `python -m` and `python -c` do: the user's module next to them imports without PYTHONPATH=.
    # (the console script's own folder, not the current one, is first on its path).
    sys.path.insert(0, os.getcwd())
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name is None or not (module_name == e.name or module_name.startswith(f"{e.name}.")):
      raise UsageError(f"importing {module_name!r} (FACTORY {reference}) failed: {_user_code_failed(e)}") from None
    raise UsageError(f"cannot import {module_name!r} ({e}); is it installed or on PYTHONPATH?") from None
  except Exception as e:  # the user's module ran and failed: SyntaxError, ImportError inside it, ...
    raise UsageError(f"importing {module_name!r} (FACTORY {reference}) failed: {_user_code_failed(e)}") from None
  factory, missing = module, object()
  try:
    for part in attribute.split("."):
      factory = getattr(factory, part, missing)
  except Exception as e:  # a module __getattr__ or a property of the user's failed
    failed = _user_code_failed(e)
    raise UsageError(f"looking up {attribute!r} in {module_name} (FACTORY {reference}) failed: {failed}") from None
  if factory is not missing and not callable(factory):
    raise UsageError(
      f"{module_name}.{attribute} is {type(factory).__name__} {_short_repr(factory)}, not a callable "
      f"(FACTORY {reference}); name a class or function that returns an nnx.Module"
    )
  if factory is missing:
    names = {name.lower(): name for name in dir(module) if not name.startswith("_")}
    close = [names[name] for name in difflib.get_close_matches(attribute.lower(), names, n=3, cutoff=0.6)]
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise UsageError(f"{module_name} has no callable {attribute!r} (FACTORY {reference}){hint}")
  return factory


def _short_repr(value: Any) -> str:
  try:
    text = repr(value)
  except Exception:  # the user's __repr__ failed; the type says enough
    return "(unprintable)"
  text = " ".join(text.split())
  return text if len(text) <= 60 else text[:57] + "..."


def _parse_literal(text: str):
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text
  except (ValueError, RecursionError) as e:  # JSON Python will not read: over 4300 digits, or nested too deep
    shown = text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"
    raise UsageError(f"--args: {shown!r} cannot be read ({first_line(e)}); pass smaller values") from None


def _methods(model: Any) -> list[str]:
  """The methods the model's own classes define (not nnx.Module's)."""
  from flax import nnx

  names = []
  for cls in type(model).__mro__:
    if cls in nnx.Module.__mro__:
      break
    names += [name for name, value in vars(cls).items() if callable(value) and (name == "__call__" or name[0] != "_")]
  return sorted(set(names))


def _check_model_accepts(model: Any, functions: dict[str, Any], options: argparse.Namespace) -> None:
  """Traces each function's method abstractly (no compiling), so that the model's own exceptions are usage errors."""
  import jax
  from flax import nnx

  graphdef, state = nnx.split(model)
  for mode, spec in functions.items():

    def trace(state, *args, spec=spec):
      model = nnx.merge(graphdef, state)
      if spec.mode is not None:  # as export does: the model in its mode first, then the method
        getattr(model, spec.mode)()
      return spec.fn(model, *args)

    try:
      jax.eval_shape(trace, state, *spec.args)
    except Exception as e:  # the model rejects these inputs: wrong count, shapes or dtypes, or its own bug
      given = " ".join(f"--input {s}" for s in options.input) or "no --input"
      hint = (
        "pass one --input per argument, e.g. --input 8x2xf32" if not options.input else "check --input and --method"
      )
      raise UsageError(
        f"{type(model).__name__}.{options.method} ({mode} mode) failed on {given}: {_user_code_failed(e)}; {hint}"
      ) from None


@contextmanager
def progress(message: str) -> Iterator[None]:
  """Prints ``message``, then the elapsed seconds every few seconds until the block ends (then the total)."""
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
  print(f"  done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)  # not after a failure


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ud800-\udfff]")


def printable(text: str) -> str:
  """``text`` with control, bidirectional and surrogate characters escaped: manifest text cannot drive the terminal."""
  return _CONTROL.sub(lambda match: ascii(match.group())[1:-1], text)


def _check_regular_file(path: pathlib.Path, option: str) -> None:
  """A file the user names for writing may be new or a regular file; a FIFO or device would block or mislead."""
  try:
    info = os.stat(path)
  except OSError:
    return
  if not stat.S_ISREG(info.st_mode) and not stat.S_ISDIR(info.st_mode):
    raise UsageError(f"{option} {str(path)!r} exists and is not a regular file (a FIFO or device); choose a file name")


def _write_output(path: pathlib.Path, array: np.ndarray) -> None:
  """``np.save`` to ``path``, opened without blocking: a FIFO or device put there after the checks is refused."""
  flags = os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)
  try:
    descriptor = os.open(path, flags, 0o666)
  except OSError as e:
    raise UsageError(f"--output {str(path)!r}: cannot write it ({e.strerror or e})") from None
  if not stat.S_ISREG(os.fstat(descriptor).st_mode):
    os.close(descriptor)
    raise UsageError(f"--output {str(path)!r} is not a regular file (a FIFO or device); choose a file name")
  os.set_blocking(descriptor, True)
  try:
    with os.fdopen(descriptor, "wb") as f:
      f.truncate(0)
      np.save(f, array)
  except OSError as e:
    raise UsageError(f"--output {str(path)!r}: cannot write it ({e.strerror or e})") from None


def _check_out(out: pathlib.Path) -> None:
  """``build --out`` must be new, or an artifact (which is replaced)."""
  if out.is_symlink() or (out.exists() and not out.is_dir()):
    raise UsageError(f"--out {str(out)!r} exists and is not a directory; choose another path")
  if out.is_dir() and not (out / "manifest.json").is_file():
    raise UsageError(
      f"--out {str(out)!r} exists and is not an nnx-metal artifact; nnx-metal replaces only artifacts: "
      "choose another directory"
    )
  _check_can_create(out, "--out")


def build(options: argparse.Namespace) -> int:
  for spec in options.input:
    if spec.startswith("@") or "=" in spec:
      raise UsageError(f"--input {spec!r}: build takes shapes such as 8x2xf32; values (=0.5, @x.npy) are for run")
  shapes = [parse_shape(spec) for spec in options.input]
  if not -(1 << 63) <= options.seed < 1 << 63:
    raise UsageError(f"--seed {options.seed} is out of range; use an integer in [-2**63, 2**63)")
  _check_out(options.out)

  import jax
  from flax import nnx

  from ._export import export, method

  factory = load_factory(options.factory)
  args = [_parse_literal(a) for a in options.args.split(",")] if options.args else []
  rngs_kwargs = {"rngs": nnx.Rngs(options.seed)} if not options.no_rngs else {}
  shown = ", ".join([*map(repr, args), *(["rngs=nnx.Rngs(SEED)"] if rngs_kwargs else [])])
  try:
    model = factory(*args, **rngs_kwargs)
  except Exception as e:  # the user's factory failed: report it, not our traceback
    hint = "check --args and --no-rngs" if isinstance(e, TypeError) else "check the factory and --args"
    raise UsageError(f"{options.factory}({shown}) failed: {_user_code_failed(e)}; {hint}") from None
  if not isinstance(model, nnx.Module):
    raise UsageError(
      f"{options.factory}({shown}) returned {type(model).__name__} {_short_repr(model)}, not an nnx.Module; "
      "FACTORY must build the model"
    )
  try:
    bound = getattr(model, options.method, None)
  except Exception as e:  # a property of the user's model failed
    raise UsageError(f"--method {options.method!r}: reading it failed: {_user_code_failed(e)}") from None
  if not callable(bound):
    raise UsageError(
      f"--method {options.method!r}: {type(model).__name__} has no method {options.method!r}; "
      f"it has {', '.join(_methods(model)) or 'none'}"
    )
  inputs = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes]
  modes = ["train", "eval"] if options.mode == "both" else [options.mode]
  functions = {mode: method(options.method, *inputs, mode=mode) for mode in modes}
  _check_model_accepts(model, functions, options)
  try:
    with progress(f"lowering and compiling {type(model).__name__}.{options.method} for {options.target}"):
      artifact = export(model, functions, target=options.target, cache=not options.no_cache)
  except OSError as e:
    if e.errno not in _NO_ROOM:
      raise
    where = os.fsdecode(e.filename) if e.filename else "a compiled file"
    raise UsageError(f"cannot write {where} ({e.strerror}); free disk space or raise the file-size limit") from None
  try:
    artifact.save(options.out)
  except OSError as e:
    if not _concerns(e, options.out.parent):
      raise
    raise UsageError(f"--out {str(options.out)!r}: cannot write {e.filename} ({e.strerror or e})") from None
  for name, spec in artifact.functions.items():
    print(f"{name}: {spec.dispatch_count} dispatches")
  print(f"wrote {options.out}{' (compiled module from the cache)' if artifact.from_cache else ''}")
  return 0


def _leaves(tree: Any) -> list[Any]:
  """The arrays of a function's return value, in order (tuples, lists, dicts by key, None)."""
  if isinstance(tree, tuple | list):
    return [leaf for item in tree for leaf in _leaves(item)]
  if isinstance(tree, dict):
    return [leaf for key in tree for leaf in _leaves(tree[key])]
  return [] if tree is None else [tree]


def _function_for(artifact: Artifact, label: str, name: str, values: list) -> Any:
  """The function ``run`` calls, its inputs checked: ``name``, or for a bucketed name the bucket of the inputs' size."""
  function = artifact.functions.get(name)
  if function is not None:
    check_inputs(function, values)
    return function
  groups = bucket_groups(artifact.functions)
  if name not in groups:
    names = [*artifact.functions, *groups]
    raise UsageError(f"--function: {label} has no function {name!r}; it has {', '.join(names)}")
  pad, members = groups[name]
  problems = []
  for size in sorted(members):
    try:
      check_inputs(artifact.functions[members[size]], values)
      return artifact.functions[members[size]]
    except SignatureError as e:
      problems.append(e)
  if pad:  # a size between buckets runs padded in the next one; the Program says if none holds it
    return artifact.functions[members[max(members)]]
  raise SignatureError(f"{name} was exported at the sizes {sorted(members)}; none fits these inputs: {problems[-1]}")


def run(options: argparse.Namespace) -> int:
  values = [parse_input(spec) for spec in options.input]  # reads .npy headers only
  artifact = open_artifact(options.artifact)
  # The inputs are checked before anything is allocated.
  function = _function_for(artifact, options.artifact, options.function, values)
  if options.output is not None:
    text = os.fspath(options.output)
    output = pathlib.Path(text if text.endswith(".npy") else f"{text}.npy")  # as np.save names it
    if not text or text.endswith(("/", os.sep)) or os.path.isdir(text) or output.is_dir():
      raise UsageError(f"--output {text!r} is a directory; give a file name such as y.npy")
    _check_can_create(output, "--output", parent_must_exist=True)
    _check_regular_file(output, "--output")
    if not function.outputs:
      raise UsageError(f"--output: {function.name} returns no arrays, so there is nothing to save")
  program = artifact.load(device=options.device)
  outputs = getattr(program, options.function)(*[value.array() for value in values])
  leaves = _leaves(outputs)
  for index, leaf in enumerate(leaves):
    array = np.asarray(leaf)
    print(f"result[{index}]: {array.dtype}{list(array.shape)}")
    print(np.array2string(array, threshold=20, precision=5))
  if options.output is not None:
    _write_output(output, np.asarray(leaves[0]))
  return 0


def _artifact_file(path: pathlib.Path, artifact_directory: pathlib.Path, artifact: Artifact) -> str | None:
  """The file of the artifact that ``path`` is (by name, link or hard link), or None."""
  for relative in ["manifest.json", *artifact.manifest.files]:
    with contextlib.suppress(OSError):
      if os.path.samefile(path, artifact_directory / relative):
        return relative
  return None


def inspect(options: argparse.Namespace) -> int:
  artifact = open_artifact(options.artifact, digest=options.digest)
  manifest = artifact.manifest
  if options.html:
    from ._report import write_report

    if options.html.is_dir():
      raise UsageError(f"--html {str(options.html)!r} is a directory; give a file name such as report.html")
    replaced = _artifact_file(options.html, options.artifact, artifact)
    if replaced is not None:
      raise UsageError(
        f"--html {str(options.html)!r} is the artifact's {replaced}; give another file name such as report.html"
      )
    _check_can_create(options.html, "--html")
    _check_regular_file(options.html, "--html")
    try:
      with progress(f"writing the report of {options.artifact}"):
        write_report(artifact, options.html)
    except OSError as e:
      if not _concerns(e, options.html.parent):
        raise
      raise UsageError(f"--html {str(options.html)!r}: cannot write {e.filename} ({e.strerror or e})") from None
    print(f"wrote {options.html}")
    return 0
  if options.json:
    print(manifest.to_json(), end="")
    return 0
  lines = [
    f"{manifest.model} for {manifest.target.name} (iree {manifest.versions.get('iree-base-compiler', '?')})",
    f"SPIR-V race check: {manifest.hazard_check} (recorded at export; `nnx-metal check` re-checks the kernels)",
    "functions:",
    *(
      f"  {spec.signature()}: {spec.dispatch_count} dispatches, updates {len(spec.updates)}"
      for spec in artifact.functions.values()
    ),
    "state:",
    *(f"  {v.name:<40} {v.variable_type:<12} {v.dtype}{list(v.shape)}" for v in artifact.state),
    f"digest: {artifact.digest}",
  ]
  if options.digest is None:
    lines.append(
      f"not authenticated without --digest (the module does not record them): {', '.join(UNAUTHENTICATED_FIELDS)}; "
      "pass the digest recorded at export to trust them"
    )
  else:
    lines.append("every field authenticated by --digest")
  for line in lines:
    print(printable(line))
  return 0


def check(options: argparse.Namespace) -> int:
  """Re-checks the SPIR-V kernels an artifact ships for data races (exit 1 if any)."""
  artifact = open_artifact(options.artifact)
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


def deploy(options: argparse.Namespace) -> int:
  """Writes a self-contained C project for one artifact (see compile/runtime/deploy.py)."""
  from .runtime import deploy as c_project

  source = options.iree_source
  if source is None:
    try:
      source = c_project.iree_runtime_source()
    except c_project.BuildError:
      source = None  # set NNX_METAL_IREE_SOURCE_DIR when configuring instead
  out = c_project.write_project(options.artifact, options.out, name=options.name, iree_source=source)
  print(f"C project in {out} (README.md): cmake -G Ninja -S {out} -B {out}/build && cmake --build {out}/build")
  return 0


def _command(commands, handler, name: str, help: str, description: str) -> argparse.ArgumentParser:
  """The subcommand ``name``, which ``main`` runs through ``handler``."""
  parser = commands.add_parser(name, help=help, description=description)
  parser.set_defaults(handler=handler)
  return parser


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="nnx-metal", description="Compile Flax NNX models with IREE and run them.")
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  p = _command(
    commands,
    build,
    "build",
    "export a model as an artifact directory",
    "Export model.<method> of the NNX module that FACTORY builds, for a target, as an artifact "
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

  p = _command(
    commands, run, "run", "run a function of an artifact", "Run one function of an artifact on given inputs."
  )
  p.add_argument("artifact", type=pathlib.Path)
  p.add_argument("--function", required=True, help="the function to run (see `nnx-metal inspect`)")
  p.add_argument("--input", action="append", default=[], help="8x2xf32=0.5 (filled), 8x2xf32 (zeros) or @x.npy; repeat")
  p.add_argument(
    "--device",
    help="IREE driver (default: the target's; on cpu, local-task where a function costs 40 MFLOP or more, "
    "else local-sync)",
  )
  p.add_argument("--output", help="save the first result as .npy")

  p = _command(
    commands, inspect, "inspect", "describe an artifact", "Print an artifact's functions, dispatches and state."
  )
  p.add_argument("artifact", type=pathlib.Path)
  p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
  p.add_argument(
    "--digest", help="the artifact's digest as recorded at export: refuse any other files, and trust every field"
  )
  p.add_argument(
    "--html", type=pathlib.Path, help="write the HTML report (treescope state, functions, MSL) to this file"
  )

  p = _command(
    commands,
    check,
    "check",
    "re-check an artifact's SPIR-V kernels for data races",
    "Look for loads of workgroup or storage-buffer memory that another invocation stored to with no "
    "barrier in between, in every SPIR-V kernel an artifact ships (spirv/). Exit status 1 if any may race.",
  )
  p.add_argument("artifact", type=pathlib.Path)

  p = _command(
    commands,
    deploy,
    "deploy",
    "write a C project that runs an artifact without Python",
    "Write a CMake project for one artifact: typed C functions per exported function, the nnx-metal C "
    "library (nnx_metal.h) over IREE's runtime, the artifact, a demo program, a Swift module map and a README "
    "for macOS and iOS.",
  )
  p.add_argument("artifact", type=pathlib.Path)
  p.add_argument("--out", type=pathlib.Path, required=True, help="the project folder to write (new or empty)")
  p.add_argument("--name", help="the C prefix of its functions (default: the artifact folder's name)")
  p.add_argument("--iree-source", type=pathlib.Path, help="IREE's source tree (default: the vendored snapshot)")

  return parser


def main(argv: list[str] | None = None) -> int:
  options = make_parser().parse_args(argv)
  try:
    return options.handler(options)
  except UsageError as e:
    print(printable(f"nnx-metal: error: {' '.join(str(e).splitlines())}"), file=sys.stderr)
  except NnxMetalError as e:
    first, *rest = str(e).splitlines() or [""]
    print(printable(f"nnx-metal {options.command}: {type(e).__name__}: {first}"), file=sys.stderr)
    if rest:  # compiler diagnostics: kept, but after the one-line summary
      print("\n".join(map(printable, rest)), file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main())
