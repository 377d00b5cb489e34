"""Artifact directories on disk: saved so that nothing is lost or half-written, read so that nothing escapes them.

A save writes a hidden sibling directory, then swaps it with the target in one atomic
step (``renameat2(RENAME_EXCHANGE)`` on Linux, ``renamex_np(RENAME_SWAP)`` on macOS)
and deletes the old one only after the swap: a process killed at any point leaves
either the old or the new directory in place. Saves into one parent directory are
serialized with an advisory lock on it, and temporaries left by killed saves are
removed by the next save.

A read holds the same lock shared, so it sees one save's files, and reads through
the directory's handle, never through a symbolic link, only regular files.
"""

import contextlib
import ctypes
import errno
import os
import pathlib
import re
import secrets
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator

from ._errors import ArtifactError

_TEMPORARY = re.compile(r"\.(?P<name>.+)\.tmp-(?P<pid>\d+)-\w+")


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
  """Atomically swaps two existing paths; False where the system cannot."""
  libc = ctypes.CDLL(None, use_errno=True)
  if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
    at_fdcwd, rename_exchange = -100, 2
    result = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
  elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
    rename_swap = 2
    result = libc.renamex_np(os.fsencode(a), os.fsencode(b), rename_swap)
  else:
    return False
  if result != 0:
    error = ctypes.get_errno()
    if error in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system cannot swap
      return False
    raise OSError(error, os.strerror(error), str(b))
  return True


def _replace(tmp: pathlib.Path, path: pathlib.Path) -> None:
  if _exchange(tmp, path):
    return
  # Two renames: a kill between them leaves the old directory under the name below.
  aside = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
  os.rename(path, aside)
  os.rename(tmp, path)
  os.rename(aside, tmp)


@contextlib.contextmanager
def _locked(directory: pathlib.Path, *, shared: bool = False) -> Iterator[None]:
  """An advisory lock on ``directory``: exclusive for a save, shared for a read."""
  try:
    import fcntl

    descriptor = os.open(directory, os.O_RDONLY)
  except (ImportError, OSError):  # no advisory locks here, or a folder we may not open: not serialized
    yield
    return
  try:
    fcntl.flock(descriptor, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
    yield
  finally:
    os.close(descriptor)  # releases the lock


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _remove(path: pathlib.Path) -> None:
  """Removes a directory tree, or anything else (a file, a link, a FIFO) without opening it."""
  try:
    is_directory = stat.S_ISDIR(os.lstat(path).st_mode)
  except FileNotFoundError:
    return
  if is_directory:
    shutil.rmtree(path, ignore_errors=True)
  else:
    with contextlib.suppress(OSError):
      os.unlink(path)


def remove_stale_temporaries(path: pathlib.Path) -> list[pathlib.Path]:
  """Removes the temporaries that killed saves of ``path`` left behind; returns them."""
  removed = []
  for sibling in path.parent.iterdir() if path.parent.is_dir() else ():
    match = _TEMPORARY.fullmatch(sibling.name)
    if match and match["name"] == path.name and not _alive(int(match["pid"])):
      _remove(sibling)
      removed.append(sibling)
  return removed


def _fsync_tree(root: pathlib.Path) -> None:
  for folder, _, files in os.walk(root):
    for name in files:
      with open(os.path.join(folder, name), "rb") as f:
        os.fsync(f.fileno())


def save_directory(
  path: str | os.PathLike, write: Callable[[pathlib.Path], None], *, may_replace: Callable[[pathlib.Path], None]
) -> pathlib.Path:
  """Writes a directory at ``path`` with ``write(tmp)``, atomically.

  Args:
    path: the directory to create or replace.
    write: fills the (empty) temporary directory it is given.
    may_replace: called with ``path`` when something is there already; raises to
      keep it (e.g. when it is not a previous save of the same kind).

  Returns:
    ``path``.
  """
  path = pathlib.Path(path)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.parent):
      remove_stale_temporaries(path)
      tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
      try:
        write(tmp)
        _fsync_tree(tmp)
        if os.path.lexists(path):
          may_replace(path)
          _replace(tmp, path)
        else:
          os.rename(tmp, path)
      finally:
        _remove(tmp)  # the old directory (or file, link, FIFO) after a swap, or the failed new one
  except OSError as e:
    raise ArtifactError(f"Cannot save to {path}: {e.strerror or e}. Nothing was written there.") from None
  return path


# Reading.


def _memory_bytes() -> int | None:
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (AttributeError, ValueError, OSError):
    return None


def _read_at(directory_fd: int, relative: str, limit: int | None, shown: pathlib.Path) -> bytes:
  """Reads ``relative`` under an open directory: each folder and the file opened without following links."""
  *folders, file_name = relative.split("/")
  opened, current = [], directory_fd
  where = shown / relative
  try:
    for folder in folders:
      current = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=current)
      opened.append(current)
    descriptor = os.open(file_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=current)
    opened.append(descriptor)
    info = os.fstat(descriptor)
    if not stat.S_ISREG(info.st_mode):
      raise ArtifactError(f"{where} is not a regular file. Export the artifact again.")
    memory = _memory_bytes()
    if (limit is not None and info.st_size > limit) or (memory is not None and info.st_size > memory):
      raise ArtifactError(f"{where} is {info.st_size} bytes, more than an artifact's file may hold here.")
    with os.fdopen(os.dup(descriptor), "rb") as f:
      return f.read()
  except FileNotFoundError:
    raise ArtifactError(f"{where} is missing: the artifact is incomplete. Export it again.") from None
  except OSError as e:
    if e.errno in (errno.ELOOP, errno.EMLINK):
      raise ArtifactError(
        f"{where} is or passes through a symbolic link; an artifact holds only its own files."
      ) from None
    if e.errno == errno.ENOTDIR:
      raise ArtifactError(f"{where}: a folder on its path is not a folder. Export the artifact again.") from None
    raise ArtifactError(f"Cannot read {where}: {e.strerror or e}.") from None
  except MemoryError:
    raise ArtifactError(f"{where} is too large to read into memory here.") from None
  finally:
    for descriptor in reversed(opened):
      os.close(descriptor)


_WHY_NOT_A_DIRECTORY = {
  errno.ENOENT: "it does not exist",
  errno.ENOTDIR: "it is not a directory",
  errno.EACCES: "it cannot be read (permission denied)",
}


@contextlib.contextmanager
def reading(directory: str | os.PathLike, *, lock: bool = True) -> Iterator[Callable[..., bytes]]:
  """``read(relative, limit=None) -> bytes`` for the files of ``directory``, one save's worth.

  ``lock=False`` is for a save that holds the (exclusive) lock already.

  Raises:
    ArtifactError: ``directory`` is not a directory, or a file is missing, not a
      regular file, reached through a link, or larger than ``limit``.
  """
  directory = pathlib.Path(directory)
  with _locked(directory.parent, shared=True) if lock else contextlib.nullcontext():
    try:
      directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
      why = _WHY_NOT_A_DIRECTORY.get(e.errno, e.strerror or str(e))
      raise ArtifactError(f"{directory} is not an nnx-metal artifact: {why}.") from None
    try:
      yield lambda relative, limit=None: _read_at(directory_fd, relative, limit, directory)
    finally:
      os.close(directory_fd)
