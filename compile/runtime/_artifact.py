"""Artifacts: an exported program as a directory you can ship, verified before anything in it is used.

Layout::

  manifest.json   what the module is (see _manifest.py), with the sha256 of every other file
  module.vmfb     the IREE module
  params.irpa     the state, one entry per variable (IREE parameter archive)
  module.mlir     the MLIR that was compiled
  msl/            Metal Shading Language source per kernel (metal)
  spirv/          SPIR-V per kernel (metal, metal-vulkan, vulkan), to re-check for races

Opening reads only the files the manifest names (no ``..``, no absolute paths, no
symbolic links), checks their hashes, reads the parameters by the manifest's types
after checking their sizes, and checks the manifest against the functions the
module itself declares. Imports the standard library, numpy and iree.runtime only.
"""

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import pathlib
import re
import stat
from typing import Any

import numpy as np
from iree import runtime as rt

from .._errors import ArtifactError
from . import _dtypes
from ._files import save_directory
from ._manifest import (
  FORMAT,
  GET_STATE,
  MANIFEST,
  MAX_MANIFEST_BYTES,
  MODULE,
  PARAMS,
  SET_STATE,
  Function,
  Manifest,
  Tensor,
  Variable,
  is_safe_file_name,
)

PARAMETER_SCOPE = "model"
# nnx_get_state declares the global order it returns in its reflection (see compile/_assemble.py).
STATE_ORDER = "nnx.state_globals"
_DECLARATION = re.compile(r"sync func @([\w$.]+)\((.*)\) -> \((.*)\)")


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


def _read_params(path: pathlib.Path, state: tuple[Variable, ...]) -> dict[str, np.ndarray]:
  """The state's arrays from an archive, read as the manifest's dtypes after checking every size."""
  index = rt.ParameterIndex()
  try:
    index.load(str(path))
  except (RuntimeError, ValueError) as e:
    raise ArtifactError(f"{path} is not an IREE parameter archive ({e}). Export the artifact again.") from None
  entries = dict(index.items())
  expected = {v.global_name for v in state}
  if set(entries) != expected:
    extra, missing = sorted(set(entries) - expected), sorted(expected - set(entries))
    raise ArtifactError(
      f"{path} does not hold this program's state (missing {missing[:3]}, unexpected {extra[:3]}): "
      "it belongs to another export. Export the artifact again."
    )
  params = {}
  for variable in state:
    entry, dtype = entries[variable.global_name], _dtypes.dtype(variable.dtype).numpy
    nbytes = variable.size * dtype.itemsize
    if entry.is_splat or entry.length != nbytes:
      raise ArtifactError(
        f"{path} holds {entry.length} bytes for {variable.name}, which needs {nbytes} "
        f"({variable.dtype}{list(variable.shape)}). The archive belongs to another export; export again."
      )
    params[variable.global_name] = np.frombuffer(entry.file_view, dtype, count=variable.size).reshape(variable.shape)
  return params


def _read_regular_file(directory: pathlib.Path, relative: str, *, limit: int | None = None) -> bytes:
  """Reads ``directory/relative`` if it and every folder on the way are real (no links), regular and small enough."""
  if not is_safe_file_name(relative) and relative != MANIFEST:
    raise ArtifactError(f"{relative!r} is not a file of an artifact.")
  path = directory
  for part in relative.split("/"):
    path = path / part
    try:
      mode = os.lstat(path).st_mode
    except FileNotFoundError:
      raise ArtifactError(f"{path} is missing: the artifact is incomplete. Export it again.") from None
    if stat.S_ISLNK(mode):
      raise ArtifactError(f"{path} is a symbolic link; an artifact holds only its own files. Export it again.")
  if not stat.S_ISREG(mode):
    raise ArtifactError(f"{path} is not a regular file. Export the artifact again.")
  if limit is not None and os.lstat(path).st_size > limit:
    raise ArtifactError(f"{path} is larger than {limit} bytes: it is not an nnx-metal manifest.")
  return path.read_bytes()


def _tensor_type(tensor: Tensor) -> str:
  element = _dtypes.dtype(tensor.device_dtype).mlir
  return f"tensor<{''.join(f'{d}x' for d in tensor.shape)}{element}>"


_TENSOR = re.compile(r"tensor<(?:[^<>]|<[^<>]*>)*>")


def _signless(tensor_type: str) -> str:
  # The declaration keeps or drops signedness depending on the op that produced a value; compare without it.
  return re.sub(r"(?<=[<x])[su]i(\d+)", r"i\1", tensor_type)


def _declared(text: str) -> list[str]:
  text = re.sub(r"\{[^{}]*\}", "", text)  # argument attributes, e.g. {iree.abi.encoding = tensor<ui32>}
  return [_signless(t) for t in _TENSOR.findall(text)]


def _check_declaration(module: rt.VmModule, name: str, inputs: list[str], outputs: list[str]) -> None:
  function = module.lookup_function(name)
  if function is None:
    raise ArtifactError(f"{MODULE} has no function {name!r}, which {MANIFEST} lists. Export the artifact again.")
  match = _DECLARATION.fullmatch(function.reflection.get("iree.abi.declaration", ""))
  declared = (_declared(match.group(2)), _declared(match.group(3))) if match else None
  if declared != ([_signless(t) for t in inputs], [_signless(t) for t in outputs]):
    raise ArtifactError(
      f"{MANIFEST} describes {name} as ({', '.join(inputs)}) -> ({', '.join(outputs)}), but {MODULE} declares "
      f"{function.reflection.get('iree.abi.declaration', 'no signature')}. The files do not belong together; "
      "export the artifact again."
    )


def check_module(vmfb: bytes, manifest: Manifest) -> None:
  """Checks ``manifest`` against the functions, signatures and state order ``vmfb`` declares.

  Raises:
    ArtifactError: they disagree (the message names the function).
  """
  try:
    module = rt.VmModule.copy_buffer(rt.VmInstance(), vmfb)
  except (RuntimeError, ValueError) as e:
    raise ArtifactError(f"{MODULE} is not an IREE module this runtime can read ({e}). Export again.") from None
  for function in manifest.functions.values():
    inputs, outputs = [_tensor_type(t) for t in function.inputs], [_tensor_type(t) for t in function.outputs]
    _check_declaration(module, function.name, inputs, outputs)
  state = [_tensor_type(v) for v in manifest.state]
  _check_declaration(module, GET_STATE, ["tensor<i32>"], state)
  _check_declaration(module, SET_STATE, ["tensor<i32>", *state], [])
  order = module.lookup_function(GET_STATE).reflection.get(STATE_ORDER)
  if order != ",".join(v.global_name for v in manifest.state):
    raise ArtifactError(
      f"{MANIFEST} lists the state in another order than {MODULE} holds it: entries were swapped or edited. "
      "Export the artifact again."
    )
  exported = set(module.function_names) - {"__init"}
  unexpected = exported - set(manifest.functions) - {GET_STATE, SET_STATE}
  if unexpected:
    raise ArtifactError(f"{MODULE} exports {sorted(unexpected)}, which {MANIFEST} does not list. Export again.")


def _check_runtime_version(directory: pathlib.Path, manifest: Manifest) -> None:
  # A .vmfb is only guaranteed to load on the IREE runtime release of its compiler.
  built_with = manifest.versions.get("iree-base-compiler", "unknown")
  runtime = package_version("iree-base-runtime")
  if built_with.split(".")[:2] != runtime.split(".")[:2]:
    raise ArtifactError(
      f"{directory} was compiled by iree-base-compiler {built_with}; this is iree-base-runtime {runtime}. "
      f"Install iree-base-runtime=={built_with} or export the artifact again."
    )


def is_artifact(path: pathlib.Path) -> bool:
  """Whether ``path`` holds an nnx-metal artifact (of any format version): what ``save`` may replace."""
  try:
    data = _read_regular_file(path, MANIFEST, limit=MAX_MANIFEST_BYTES)
    return json.loads(data).get("format") == FORMAT
  except (ArtifactError, OSError, ValueError, AttributeError):
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
  """

  def __init__(self, manifest: Manifest, files: dict[str, bytes], params: dict[str, np.ndarray], *, from_cache=False):
    self.manifest, self.files, self.params, self.from_cache = manifest, files, params, from_cache

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
      if not overwrite and not (path.is_dir() and not path.is_symlink() and is_artifact(path)):
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
      (tmp / MANIFEST).write_text(manifest.to_json())
      self.manifest = manifest

    return save_directory(directory, write, may_replace=may_replace)

  @classmethod
  def open(cls, directory: str | os.PathLike) -> "Artifact":
    """Opens and verifies an artifact directory.

    Raises:
      ArtifactError: a missing, corrupt, edited or foreign file, a manifest that
        does not describe the module, or an IREE release this runtime cannot load.
        The message names the file or the manifest field.
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
      raise ArtifactError(f"{directory} is not an nnx-metal artifact: it is not a directory.")
    if not os.path.lexists(directory / MANIFEST):
      raise ArtifactError(f"{directory} is not an nnx-metal artifact: it has no {MANIFEST}.")
    try:
      manifest = Manifest.from_json(_read_regular_file(directory, MANIFEST, limit=MAX_MANIFEST_BYTES))
    except ArtifactError as e:
      raise ArtifactError(f"{directory}: {e}") from None
    files = {}
    for relative, expected in manifest.files.items():
      data = _read_regular_file(directory, relative)
      if sha256(data) != expected:
        raise ArtifactError(
          f"{directory / relative} is corrupt or was changed: its sha256 is not the one in {MANIFEST}. "
          "Export the artifact again."
        )
      if relative != PARAMS:
        files[relative] = data
    _check_runtime_version(directory, manifest)
    check_module(files[MODULE], manifest)
    params = _read_params(directory / PARAMS, manifest.state)
    return cls(manifest, files, params)

  def load(self, *, device: str | None = None):
    """A :class:`compile.Program` running this artifact on ``device`` (an IREE driver; default: the target's)."""
    from ._program import Program

    return Program(self, device=device)
