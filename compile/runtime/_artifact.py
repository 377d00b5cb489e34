"""Artifacts: an exported program as a directory you can ship, verified before anything in it is used.

Its files are listed in _file_names.py. Opening reads only the files the manifest names, through the directory's handle
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

from ._errors import ArtifactError
from ._file_names import FORMAT, MANIFEST, MAX_MANIFEST_BYTES, MODULE, PARAMS, is_safe_file_name, kernel_files
from ._files import reading, save_directory
from ._manifest import Manifest
from ._module_check import check_module
from ._params import params_index, read_params
from ._program import Program
from ._records import Function, Variable
from ._variables import nnx_state


def package_version(name: str) -> str:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


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
    return kernel_files(self.files, "spirv")

  def saved_state(self) -> Any:
    """The state the artifact holds, as an ``nnx.State`` (needs flax; no device)."""
    return nnx_state(self.state, {v.name: self.params[v.global_name] for v in self.state})

  def with_params(self, params: dict[str, np.ndarray]) -> "Artifact":
    """The same program with other state values (e.g. after training)."""
    return Artifact(self.manifest, self.files, params)

  def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> "Artifact":
    """Writes the artifact into ``directory``: complete, or not at all; the old artifact stays until the swap.

    Args:
      directory: where to write it. An existing artifact there is replaced.
      overwrite: also replace a ``directory`` that is not an nnx-metal artifact.

    Returns:
      The artifact as written: its manifest lists the sha256 of every file, and its
      :attr:`digest` pins it (``self`` is left as it was).

    Raises:
      ArtifactError: ``directory`` holds something else and ``overwrite`` is False.
    """
    written = []

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
      written.append(Artifact(manifest, self.files, self.params, digest=sha256(text)))

    save_directory(directory, write, may_replace=may_replace)
    return written[0]

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
    return Program(self, device=device)


def load_program(directory: str | os.PathLike, *, device: str | None = None, digest: str | None = None) -> Program:
  """Opens, verifies and loads an artifact directory (see :meth:`Artifact.open`)."""
  return Artifact.open(directory, digest=digest).load(device=device)
