"""Artifacts: an exported program as a directory you can ship, verified before anything in it is used.

Layout::

  manifest.json   what the module is (see _manifest.py), with the sha256 of every other file
  module.vmfb     the IREE module
  params.irpa     the state, one entry per variable (IREE parameter archive)
  module.mlir     the MLIR that was compiled
  msl/            Metal Shading Language source per kernel (metal)
  spirv/          SPIR-V per kernel (metal, metal-vulkan, vulkan), to re-check for races

Opening reads only the files the manifest names, through the directory's handle
(no ``..``, no absolute paths, no symbolic links; see _files.py), checks their
hashes, checks the manifest against the module (_module_check.py), and reads the
parameters from the verified bytes by the manifest's types after checking their
sizes. ``digest`` pins a whole artifact: a module is native code, and only a digest
you trust tells an artifact from one whose files and hashes were all replaced.
Imports the standard library, numpy and iree.runtime only.
"""

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import pathlib
from typing import Any

import numpy as np
from iree import runtime as rt

from .._errors import ArtifactError
from . import _dtypes
from ._files import reading, save_directory
from ._manifest import (
  FORMAT,
  MANIFEST,
  MAX_MANIFEST_BYTES,
  MODULE,
  PARAMS,
  Function,
  Manifest,
  Variable,
  is_safe_file_name,
)
from ._module_check import check_module

PARAMETER_SCOPE = "model"


def package_version(name: str) -> str:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _plain(array: np.ndarray) -> np.ndarray:
  # iree.runtime knows no ml_dtypes (bfloat16, float8): archive their bytes as unsigned integers.
  array = np.ascontiguousarray(array)
  return array.view(f"u{array.dtype.itemsize}") if array.dtype.kind == "V" else array


def params_index(params: dict[str, np.ndarray]) -> rt.ParameterIndex:
  """A parameter index holding ``params`` (global name -> array), as IREE's parameter modules read it."""
  index = rt.ParameterIndex()
  for name, array in params.items():
    rt.parameter_index_add_numpy_ndarray(index, name, _plain(array))
  return index


def _entries(data: bytes) -> dict[str, Any]:
  index = rt.ParameterIndex()
  try:
    index.load_from_file_handle(rt.FileHandle.wrap_memory(data), "irpa")
    return {key: (entry.length, entry.is_splat, entry.file_view) for key, entry in index.items()}
  except Exception as e:  # noqa: BLE001 - a native parser reading hostile bytes: whatever it raises, refuse
    raise ArtifactError(f"{PARAMS} is not an IREE parameter archive ({type(e).__name__}: {e}).") from None


def read_params(data: bytes, state: tuple[Variable, ...]) -> dict[str, np.ndarray]:
  """The state's arrays from the verified bytes of an archive, as the manifest's dtypes, sizes checked first.

  The archive is parsed from the bytes whose hash was checked, not from the file
  again, and the arrays are copies: what was verified is what is used.
  """
  entries = _entries(data)
  expected = {v.global_name for v in state}
  if set(entries) != expected:
    extra, missing = sorted(set(entries) - expected), sorted(expected - set(entries))
    raise ArtifactError(
      f"{PARAMS} does not hold this program's state (missing {missing[:3]}, unexpected {extra[:3]}): "
      "it belongs to another export. Export the artifact again."
    )
  params = {}
  for variable in state:
    length, splat, view = entries[variable.global_name]
    dtype = _dtypes.dtype(variable.dtype).numpy
    nbytes = variable.size * dtype.itemsize
    if splat or length != nbytes or len(view) < nbytes:
      raise ArtifactError(
        f"{PARAMS} holds {length} bytes for {variable.name}, which needs {nbytes} "
        f"({variable.dtype}{list(variable.shape)}). The archive belongs to another export; export again."
      )
    params[variable.global_name] = np.frombuffer(view, dtype, count=variable.size).reshape(variable.shape).copy()
  return params


def _check_runtime_version(directory: pathlib.Path, manifest: Manifest) -> None:
  # A .vmfb is only guaranteed to load on the IREE runtime release of its compiler.
  built_with = manifest.versions.get("iree-base-compiler", "unknown")
  runtime = package_version("iree-base-runtime")
  if built_with.split(".")[:2] != runtime.split(".")[:2]:
    raise ArtifactError(
      f"{directory} was compiled by iree-base-compiler {built_with}; this is iree-base-runtime {runtime}. "
      f"Install iree-base-runtime=={built_with} or export the artifact again."
    )


def is_artifact(path: pathlib.Path, *, lock: bool = True) -> bool:
  """Whether ``path`` holds an nnx-metal artifact (of any format version): what ``save`` may replace."""
  try:
    with reading(path, lock=lock) as read:
      return json.loads(read(MANIFEST, MAX_MANIFEST_BYTES)).get("format") == FORMAT
  except (ArtifactError, ValueError, AttributeError, RecursionError):
    return False


class Artifact:
  """An exported program: manifest, IREE module, parameter archive and sources.

  Made by :func:`compile.export` or opened from disk with :meth:`open`; run it with :meth:`load`.

  Attributes:
    manifest: the validated manifest.
    files: every file but the manifest and the parameters, ``{relative path: bytes}``.
    params: the state's values, ``{global name: array}``, in the variables' own dtypes (the
      module reads float64 parameters and demotes them itself on targets without f64).
    from_cache: whether export found its compiled module in the compile cache.
    digest: the sha256 of its ``manifest.json``, which holds the sha256 of every other file:
      one value that pins the whole artifact (``Artifact.open(directory, digest=...)``).
      None until the artifact is saved or opened.
  """

  def __init__(
    self,
    manifest: Manifest,
    files: dict[str, bytes],
    params: dict[str, np.ndarray],
    *,
    from_cache: bool = False,
    digest: str | None = None,
  ):
    self.manifest, self.files, self.params = manifest, files, params
    self.from_cache, self.digest = from_cache, digest

  @property
  def vmfb(self) -> bytes:
    return self.files[MODULE]

  @property
  def target(self) -> str:
    return self.manifest.target.name

  @property
  def functions(self) -> dict[str, Function]:
    return self.manifest.functions

  @property
  def state(self) -> tuple[Variable, ...]:
    return self.manifest.state

  def spirv(self) -> dict[str, bytes]:
    """``{kernel: SPIR-V binary}`` of every kernel (SPIR-V targets), for re-checking with ``compile.find_races``."""
    return {path[6:-4]: data for path, data in self.files.items() if path.startswith("spirv/")}

  def saved_state(self) -> Any:
    """The state the artifact holds, as an ``nnx.State`` (needs flax; no device)."""
    from ._program import nnx_state

    return nnx_state(self.state, {v.name: self.params[v.global_name] for v in self.state})

  def with_params(self, params: dict[str, np.ndarray]) -> "Artifact":
    """The same program with other state values (e.g. after training)."""
    return Artifact(self.manifest, self.files, params)

  def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> pathlib.Path:
    """Writes the artifact into ``directory``: complete, or not at all; the old artifact stays until the swap.

    Args:
      directory: where to write it. An existing artifact there is replaced.
      overwrite: also replace a ``directory`` that is not an nnx-metal artifact.

    Raises:
      ArtifactError: ``directory`` holds something else and ``overwrite`` is False.
    """

    def may_replace(path: pathlib.Path) -> None:
      if not overwrite and not (path.is_dir() and not path.is_symlink() and is_artifact(path, lock=False)):
        raise ArtifactError(
          f"{path} exists and is not an nnx-metal artifact; nothing was written. Choose another directory, "
          "or pass overwrite=True to replace it."
        )

    def write(tmp: pathlib.Path) -> None:
      hashes = {}
      for relative, data in self.files.items():
        if not is_safe_file_name(relative):
          raise ArtifactError(f"{relative!r} is not a file of an artifact; nothing was written.")
        (tmp / relative).parent.mkdir(exist_ok=True)
        (tmp / relative).write_bytes(data)
        hashes[relative] = sha256(data)
      params_index(self.params).create_archive_file(str(tmp / PARAMS))
      hashes[PARAMS] = sha256((tmp / PARAMS).read_bytes())
      manifest = dataclasses.replace(self.manifest, files=hashes)
      text = manifest.to_json().encode()
      (tmp / MANIFEST).write_bytes(text)
      self.manifest, self.digest = manifest, sha256(text)

    return save_directory(directory, write, may_replace=may_replace)

  @classmethod
  def open(cls, directory: str | os.PathLike, *, digest: str | None = None) -> "Artifact":
    """Opens and verifies an artifact directory.

    Args:
      directory: the artifact.
      digest: the artifact's :attr:`digest` as you recorded it when you exported it
        (or as its publisher states it): pins every file of the artifact.

    Raises:
      ArtifactError: a missing, corrupt, edited or foreign file, a manifest that
        does not describe the module, another digest, or an IREE release this runtime
        cannot load. The message names the file or the manifest field.
    """
    directory = pathlib.Path(directory)
    with reading(directory) as read:
      if not os.path.lexists(directory / MANIFEST):
        raise ArtifactError(f"{directory} is not an nnx-metal artifact: it has no {MANIFEST}.")
      text = read(MANIFEST, MAX_MANIFEST_BYTES)
      if digest is not None and sha256(text) != digest:
        raise ArtifactError(f"{directory} is not the artifact of digest {digest}: its {MANIFEST} has another.")
      try:
        manifest = Manifest.from_json(text)
      except ArtifactError as e:
        raise ArtifactError(f"{directory}: {e}") from None
      files = {relative: read(relative) for relative in manifest.files}
    for relative, data in files.items():
      if sha256(data) != manifest.files[relative]:
        raise ArtifactError(
          f"{directory / relative} is corrupt or was changed: its sha256 is not the one in {MANIFEST}. "
          "Export the artifact again."
        )
    _check_runtime_version(directory, manifest)
    check_module(files[MODULE], manifest)
    params = read_params(files.pop(PARAMS), manifest.state)
    return cls(manifest, files, params, digest=sha256(text))

  def load(self, *, device: str | None = None):
    """A :class:`compile.Program` running this artifact on ``device`` (an IREE driver).

    The default is the target's first driver; on ``cpu``, ``local-task`` (IREE's thread
    pool) instead of ``local-sync`` where a function costs 40 MFLOP a call or more.
    """
    from ._program import Program

    return Program(self, device=device)
