"""A content-addressed cache of iree-compile results: the same program, target, flags and versions compile once.

The key is the sha256 of the assembled MLIR without its source locations (it holds the
GraphDef's structure, every shape and dtype, and the traced code), the target, the full
flags and the versions of jax, flax, iree-base-compiler and nnx-metal. Locations are left
out because they depend on what the process traced before (see
``_stablehlo.without_locations``), not on the program; a hit's module then carries the
first compile's locations in its debug information. A recorded failure is keyed with
the locations, since its message names the Python line. Entries are written to a
temporary directory and renamed into place, so two processes exporting the same
model at once each see either no entry or a complete one; a corrupt entry is
detected by its hashes and compiled again.
"""

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
import warnings
from collections.abc import Mapping

from ._iree import Binary, compile_module, module_flags
from ._stablehlo import OpSite, without_locations
from ._targets import Target
from .runtime import MODULE, CompileError, is_safe_file_name, kernel_file, package_version, sha256

ENTRY_FORMAT = 5  # 4: calls count each iteration of a loop with static bounds; 5: keys without locations
_META_FIELDS = ("flags", "dispatches", "compile_seconds", "calls")


def toolchain_versions() -> dict[str, str]:
  """The versions an artifact (and a cache entry) depends on."""
  return {name: package_version(name) for name in ("jax", "flax", "iree-base-compiler", "nnx-metal")}


def default_directory() -> pathlib.Path:
  """``$NNX_METAL_CACHE``, else ``~/.cache/nnx-metal``."""
  return pathlib.Path(os.environ.get("NNX_METAL_CACHE") or pathlib.Path.home() / ".cache" / "nnx-metal")


class CompileCache:
  """iree-compile results on disk, one directory per key."""

  def __init__(self, directory: str | os.PathLike | None = None):
    self.directory = pathlib.Path(directory) if directory is not None else default_directory()

  def key(self, mlir: str, target: Target, flags: tuple[str, ...], *, locations: bool = False) -> str:
    """The entry of ``mlir`` compiled for ``target`` with ``flags``; ``locations``: keyed with them too."""
    code = mlir if locations else without_locations(mlir)
    identity = {"entry": ENTRY_FORMAT, "mlir": sha256(code.encode()), "target": target.name, "flags": list(flags)}
    return sha256(json.dumps({**identity, "versions": toolchain_versions()}, sort_keys=True).encode())

  def _path(self, key: str) -> pathlib.Path:
    return self.directory / key[:2] / key

  def get(self, key: str) -> Binary | None:
    """The cached Binary, or None if absent or corrupt (then it is compiled again)."""
    path = self._path(key)
    try:
      meta = json.loads((path / "binary.json").read_text())
      if not all(is_safe_file_name(relative) for relative in meta["files"]):
        return None  # never read outside the entry, whatever binary.json says
      files = {relative: (path / relative).read_bytes() for relative in meta["files"]}
      if any(sha256(data) != meta["files"][relative] for relative, data in files.items()):
        return None
      return Binary(
        vmfb=files[MODULE],
        flags=tuple(meta["flags"]),
        dispatches=tuple(meta["dispatches"]),
        msl={name: files[kernel_file("msl", name)].decode() for name in meta["msl"]},
        spirv={name: files[kernel_file("spirv", name)] for name in meta["spirv"]},
        compile_seconds=meta["compile_seconds"],
        calls=dict(meta["calls"]),
        origins={name: [(scope, int(index)) for scope, index in tags] for name, tags in meta["origins"].items()},
      )
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
      return None

  def _failure_path(self, key: str) -> pathlib.Path:
    return self.directory / key[:2] / f"{key}.failed.json"

  def get_failure(self, key: str) -> CompileError | None:
    """The CompileError iree-compile raised for ``key`` before, or None (none recorded, or unreadable)."""
    try:
      record = json.loads(self._failure_path(key).read_text())
      error = CompileError(record["target"], list(record["flags"]), record["diagnostics"], culprit=record["culprit"])
      error.kernels = {kernel: [(scope, int(i)) for scope, i in tags] for kernel, tags in record["kernels"].items()}
      return error
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
      return None

  def put_failure(self, key: str, error: CompileError) -> None:
    """Records that iree-compile failed for ``key``: the same input and flags fail the same way."""
    path = self._failure_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {k: getattr(error, k) for k in ("target", "flags", "diagnostics", "culprit", "kernels")}
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{key[:16]}.", delete=False) as tmp:
      json.dump(record, tmp)
    os.replace(tmp.name, path)

  def put(self, key: str, binary: Binary) -> None:
    path = self._path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{key[:16]}.", dir=path.parent))
    try:
      files = binary.files()
      for relative, data in files.items():
        (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp / relative).write_bytes(data)
      meta = {
        **{k: v for k, v in dataclasses.asdict(binary).items() if k in _META_FIELDS},
        "origins": binary.origins,
        "msl": sorted(binary.msl),
        "spirv": sorted(binary.spirv),
        "files": {relative: sha256(data) for relative, data in files.items()},
      }
      (tmp / "binary.json").write_text(json.dumps(meta, indent=1))
      if path.exists() and self.get(key) is None:
        _remove(path)  # a corrupt entry, replaced below
      try:
        os.rename(tmp, path)
      except OSError:
        pass  # another process stored this key first; same key, same content
    finally:
      shutil.rmtree(tmp, ignore_errors=True)


def _remove(path: pathlib.Path) -> None:
  aside = path.with_name(f".{path.name}.corrupt-{os.getpid()}")
  try:
    os.rename(path, aside)
  except OSError:
    return  # another process moved it first
  shutil.rmtree(aside, ignore_errors=True)


def compile_cached(
  mlir: str,
  module_name: str,
  target: Target,
  extra_flags: tuple[str, ...],
  cache: CompileCache | None,
  sites: Mapping[str, tuple[OpSite, ...]],
) -> tuple[Binary, bool]:
  """``compile_module`` through ``cache`` (None: no cache). Returns the Binary and whether it was a hit."""
  if cache is None:
    return compile_module(mlir, module_name, target, extra_flags, sites=sites), False
  flags = module_flags(mlir, target, extra_flags)
  key = cache.key(mlir, target, flags)
  binary = cache.get(key)
  if binary is not None:
    return binary, True
  failed = cache.key(mlir, target, flags, locations=True)  # a failure's message names this trace's lines
  failure = cache.get_failure(failed)
  if failure is not None:
    raise failure  # iree-compile failed on this very input before: export's retry moves on at once
  try:
    binary = compile_module(mlir, module_name, target, extra_flags, sites=sites)
  except CompileError as error:
    _best_effort(cache.put_failure, failed, error)
    raise
  _best_effort(cache.put, key, binary)
  return binary, False


def _best_effort(write, key: str, value) -> None:
  """A cache write that fails (a full disk, a read-only home) costs a compile next time, not this export."""
  try:
    write(key, value)
  except OSError as e:
    why = e.strerror or e
    warnings.warn(f"nnx-metal's compile cache was not written ({why}); the next export compiles again.", stacklevel=4)
