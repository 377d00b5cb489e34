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
import os
import pathlib
import stat
from typing import Any

import numpy as np

from . import _dtypes
from ._errors import ArtifactError, StateMismatchError
from ._fields import parse_json
from ._file_names import FORMAT, MANIFEST, MAX_MANIFEST_BYTES, MODULE, PARAMS, is_safe_file_name, kernel_files
from ._files import MARKER, reading, save_directory
from ._manifest import Manifest
from ._module_check import check_module
from ._params import read_params, write_params
from ._program import Program
from ._records import Function, Variable
from ._variables import nnx_state

# The longest file name (in bytes) the common file systems take.
MAX_NAME_BYTES = 255


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


def own_files(path: pathlib.Path) -> set[str] | None:
  """The files of the nnx-metal artifact (of any format version) in ``path``, or None if it holds none.

  An artifact is a manifest that lists ``module.vmfb`` and ``params.irpa`` with files that
  are there with the sha256 it lists: a ``manifest.json`` that merely claims the format
  is not one (a save does not replace it without ``overwrite``).
  """
  try:
    with reading(path, lock=False) as read:
      document = parse_json(read(MANIFEST, MAX_MANIFEST_BYTES))
      files = document.get("files") if isinstance(document, dict) and document.get("format") == FORMAT else None
      if not isinstance(files, dict) or not {MODULE, PARAMS} <= set(files):
        return None
      for relative, digest in files.items():
        if not is_safe_file_name(relative) or sha256(read(relative)) != digest:
          return None
  except ArtifactError:
    return None
  return {MANIFEST, MARKER, *files}


def _user_entries(root: pathlib.Path, own: set[str], folder: str = "") -> list[str]:
  """What is in ``root`` (under ``folder``) besides the artifact's ``own`` files: a user's, kept by a save."""
  entries = []
  for name in sorted(os.listdir(root / folder if folder else root)):
    relative = f"{folder}/{name}" if folder else name
    if relative in own:
      continue
    holds_own = any(path.startswith(f"{relative}/") for path in own)
    if holds_own and stat.S_ISDIR(os.lstat(root / relative).st_mode):
      entries += _user_entries(root, own, relative)
    else:
      entries.append(relative)
  return entries


def checked_params(params: Any, state: tuple[Variable, ...]) -> dict[str, np.ndarray]:
  """``params`` as the archive holds them, ``{global name: array}``, each as its variable's dtype and shape.

  Raises:
    StateMismatchError: not a dict, a variable missing, a name the program does not have,
      another dtype (float64 for float32) or shape, or a value that is no array of numbers.
  """
  if not isinstance(params, dict):
    raise StateMismatchError(f"The parameters must be a dict {{global name: array}}, not {type(params).__name__}.")
  variables = {v.global_name: v for v in state}
  unknown = [name for name in params if name not in variables]
  missing = [name for name in variables if name not in params]
  if unknown or missing:
    raise StateMismatchError(
      f"The parameters must hold exactly this program's state variables, by global name: "
      f"{len(missing)} missing {missing[:3]}, {len(unknown)} unknown {[str(n)[:40] for n in unknown[:3]]}. "
      "Nothing was written."
    )
  checked = {}
  for name, variable in variables.items():
    array = _dtypes.as_array(params[name], f"Parameter {variable.name}")
    if array.dtype.name != variable.dtype or array.shape != variable.shape:
      raise StateMismatchError(
        f"Parameter {variable.name}: expected {variable.dtype}{list(variable.shape)}, got "
        f"{array.dtype.name}{list(array.shape)}; nothing was written. Cast it, or export the model again."
      )
    checked[name] = array
  return checked


def _check_name_lengths(files) -> None:
  for relative in files:
    for part in relative.split("/"):
      if len(os.fsencode(part)) > MAX_NAME_BYTES:
        raise ArtifactError(
          f"{relative[:80]}... has a name of {len(os.fsencode(part))} bytes, more than a file system takes "
          f"({MAX_NAME_BYTES}); nothing was written. Export it with shorter function names."
        )


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
    """The same program with other state values (e.g. after training), ``{global name: array}``.

    Raises:
      StateMismatchError: a variable missing or unknown, or another dtype or shape (see :func:`checked_params`).
    """
    return Artifact(self.manifest, self.files, checked_params(params, self.state))

  def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> "Artifact":
    """Writes the artifact into ``directory``: complete, or not at all; the old artifact stays until the swap.

    Args:
      directory: where to write it. An existing artifact there is replaced.
      overwrite: also replace a ``directory`` that is not an nnx-metal artifact.

    Returns:
      The artifact as written: its manifest lists the sha256 of every file, and its
      :attr:`digest` pins it (``self`` is left as it was).

    Files a user put into an artifact there (a ``report.html``) are kept; only the old
    artifact's own files go.

    Raises:
      ArtifactError: ``directory`` holds something else and ``overwrite`` is False, or the
        artifact cannot be written whole there (a full disk); nothing was written.
      StateMismatchError: :attr:`params` do not fit the program's state.
    """
    written = []
    params = checked_params(self.params, self.state)
    for relative in self.files:
      if not is_safe_file_name(relative):
        raise ArtifactError(f"{relative!r} is not a file of an artifact; nothing was written.")
    _check_name_lengths(self.files)

    def may_replace(path: pathlib.Path) -> list[str]:
      own = own_files(path) if stat.S_ISDIR(os.lstat(path).st_mode) else None
      if own is not None:
        return _user_entries(path, own)
      if overwrite:
        return []
      raise ArtifactError(
        f"{path} exists and is not an nnx-metal artifact; nothing was written. Choose another directory, "
        "or pass overwrite=True to replace it."
      )

    def write(tmp: pathlib.Path) -> None:
      hashes = {}
      for relative, data in self.files.items():
        (tmp / relative).parent.mkdir(exist_ok=True)
        (tmp / relative).write_bytes(data)
        hashes[relative] = sha256(data)
      archive = write_params(tmp / PARAMS, params)
      os.chmod(tmp / PARAMS, stat.S_IMODE(os.stat(tmp / MODULE).st_mode))  # IREE writes 0640: the umask decides
      hashes[PARAMS] = sha256(archive)
      manifest = dataclasses.replace(self.manifest, files=hashes)
      text = manifest.to_json().encode()
      (tmp / MANIFEST).write_bytes(text)
      written.append(Artifact(manifest, self.files, params, digest=sha256(text)))

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
      # The parameters in page-aligned memory: a cpu device then uses them in place (see _files._read_at).
      files = {relative: read(relative, aligned=relative == PARAMS) for relative in manifest.files}
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
