"""Artifacts: an exported program as a directory you can ship, verified when opened.

Layout::

  manifest.json   what the module is: format version, model class, GraphDef
                  fingerprint, every state variable and function, target, flags,
                  versions, and the sha256 of every other file
  module.vmfb     the IREE module
  params.irpa     the state, one entry per variable (IREE parameter archive)
  module.mlir     the MLIR that was compiled
  msl/            Metal Shading Language source per dispatch (``metal`` only)

Imports only the standard library, numpy and iree.runtime: the deployment path needs no JAX.
"""

import hashlib
import importlib.metadata
import json
import pathlib
from typing import Any

import numpy as np
from iree import runtime as rt

from ._errors import ArtifactError
from ._files import atomic_directory

FORMAT = "nnx-metal-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODULE = "module.vmfb"
PARAMS = "params.irpa"
PARAMETER_SCOPE = "model"
# The module's own functions that read and write every state global.
GET_STATE = "nnx_get_state"
SET_STATE = "nnx_set_state"


def package_version(name: str) -> str:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def toolchain_versions() -> dict[str, str]:
  """The versions an artifact (and a cache entry) depends on."""
  return {name: package_version(name) for name in ("jax", "flax", "iree-base-compiler", "nnx-metal")}


def path_name(path: tuple) -> str:
  """A state variable's name: its NNX path joined with dots (``linear1.w``, ``layers.0.b``)."""
  return ".".join(str(part) for part in path)


def _major_minor(version: str) -> str:
  return ".".join(version.split(".")[:2])


def sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def params_index(arrays: dict[str, np.ndarray]) -> rt.ParameterIndex:
  """A parameter index holding ``arrays`` (name -> array), as IREE's parameter modules read it."""
  index = rt.ParameterIndex()
  for name, array in arrays.items():
    rt.parameter_index_add_numpy_ndarray(index, name, np.asarray(array, order="C"))
  return index


def index_arrays(index: rt.ParameterIndex) -> dict[str, np.ndarray]:
  """The arrays of a parameter index, copied out of the (possibly memory-mapped) archive."""
  return {key: np.array(rt.parameter_index_entry_as_numpy_ndarray(entry)) for key, entry in index.items()}


class Artifact:
  """An exported program: manifest, IREE module, parameter archive and sources.

  Made by :func:`compile.export` or opened from disk with :meth:`open`; run it with
  :meth:`load`.

  Attributes:
    manifest: the parsed ``manifest.json``.
    files: every file but the manifest and the parameters, ``{relative path: bytes}``.
    params: the state's initial values, ``{global name: array}`` in device dtypes.
    from_cache: whether export found its compiled module in the compile cache.
  """

  def __init__(
    self, manifest: dict[str, Any], files: dict[str, bytes], params: dict[str, np.ndarray], *, from_cache=False
  ):
    self.manifest, self.files, self.params, self.from_cache = manifest, files, params, from_cache

  @property
  def vmfb(self) -> bytes:
    return self.files[MODULE]

  @property
  def target(self) -> str:
    return self.manifest["target"]["name"]

  @property
  def functions(self) -> dict[str, dict[str, Any]]:
    """``{name: {"inputs", "outputs", "updates", "dispatch_count", ...}}`` from the manifest."""
    return self.manifest["functions"]

  @property
  def state(self) -> list[dict[str, Any]]:
    """One entry per state variable: path, name, global, variable type, shape, dtype, device dtype."""
    return self.manifest["state"]

  def saved_state(self):
    """The state the artifact was saved with, as an ``nnx.State`` (needs flax; no device)."""
    from ._program import nnx_state

    arrays = {entry["name"]: self.params[entry["global"]].astype(entry["dtype"]) for entry in self.state}
    return nnx_state(self.state, arrays)

  def with_params(self, params: dict[str, np.ndarray]) -> "Artifact":
    """The same program with other state values (e.g. after training)."""
    return Artifact(self.manifest, self.files, params)

  def save(self, directory: str | pathlib.Path) -> pathlib.Path:
    """Writes the artifact into ``directory`` atomically: complete, or not at all.

    ``manifest.json`` is written last, with the sha256 of every other file.
    """
    directory = pathlib.Path(directory)
    with atomic_directory(directory) as tmp:
      hashes = {}
      for relative, data in self.files.items():
        (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp / relative).write_bytes(data)
        hashes[relative] = sha256(data)
      params_index(self.params).create_archive_file(str(tmp / PARAMS))
      hashes[PARAMS] = sha256((tmp / PARAMS).read_bytes())
      manifest = {**self.manifest, "files": dict(sorted(hashes.items()))}
      (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    self.manifest = manifest
    return directory

  @classmethod
  def open(cls, directory: str | pathlib.Path) -> "Artifact":
    """Opens and verifies an artifact directory.

    Raises:
      ArtifactError: the manifest is missing or of another format version, a file
        is missing or its sha256 differs (corrupt or truncated), or the artifact
        was compiled by an IREE release this runtime cannot load.
    """
    directory = pathlib.Path(directory)
    manifest = _read_manifest(directory)
    files = {}
    for relative, expected in manifest.get("files", {}).items():
      path = directory / relative
      if not path.is_file():
        raise ArtifactError(f"{path} is missing: the artifact is incomplete. Export it again.")
      data = path.read_bytes()
      if sha256(data) != expected:
        raise ArtifactError(
          f"{path} is corrupt or truncated: its sha256 is not the one in {MANIFEST}. Export the artifact again."
        )
      if relative != PARAMS:
        files[relative] = data
    _check_runtime_version(directory, manifest)
    index = rt.ParameterIndex()
    index.load(str(directory / PARAMS))
    params = index_arrays(index)
    _check_params(directory, manifest, params)
    return cls(manifest, files, params)

  def load(self, *, device: str | None = None):
    """A :class:`compile.Program` running this artifact on ``device`` (an IREE driver; default: the target's)."""
    from ._program import Program

    return Program(self, device=device)


def _read_manifest(directory: pathlib.Path) -> dict[str, Any]:
  path = directory / MANIFEST
  if not path.is_file():
    raise ArtifactError(f"{directory} is not an nnx-metal artifact: it has no {MANIFEST}.")
  try:
    manifest = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ArtifactError(f"{path} is not valid JSON ({e}): the artifact is corrupt. Export it again.") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise ArtifactError(f'{path} is not an nnx-metal manifest (no "format": "{FORMAT}").')
  if manifest.get("format_version") != FORMAT_VERSION:
    raise ArtifactError(
      f"{directory} has artifact format version {manifest.get('format_version')}; this nnx-metal reads "
      f"version {FORMAT_VERSION}. Export it again with this version."
    )
  return manifest


def _check_runtime_version(directory: pathlib.Path, manifest: dict[str, Any]) -> None:
  # A .vmfb is only guaranteed to load on the IREE runtime release of its compiler.
  built_with = manifest["versions"]["iree-base-compiler"]
  runtime = package_version("iree-base-runtime")
  if _major_minor(built_with) != _major_minor(runtime):
    raise ArtifactError(
      f"{directory} was compiled by iree-base-compiler {built_with}; this is iree-base-runtime {runtime}. "
      f"Install iree-base-runtime=={built_with} or export the artifact again."
    )


def _check_params(directory: pathlib.Path, manifest: dict[str, Any], params: dict[str, np.ndarray]) -> None:
  for entry in manifest["state"]:
    array = params.get(entry["global"])
    expected = (tuple(entry["shape"]), entry["device_dtype"])
    if array is None or (array.shape, array.dtype.name) != expected:
      got = "nothing" if array is None else f"{array.dtype.name}{list(array.shape)}"
      raise ArtifactError(
        f"{directory / PARAMS} holds {got} for {entry['name']}, expected "
        f"{entry['device_dtype']}{entry['shape']}. The archive belongs to another export; export again."
      )
