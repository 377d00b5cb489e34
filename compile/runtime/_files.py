"""Artifact directories on disk: saved so that nothing is lost or half-written, read so that nothing escapes them.

A save writes a hidden sibling directory, then swaps it with the target in one atomic
step (``renameat2(RENAME_EXCHANGE)`` on Linux, ``renamex_np(RENAME_SWAP)`` on macOS)
and deletes the old one only after the swap: a process killed at any point leaves
either the old or the new directory in place. Saves into one parent directory are
serialized with an advisory lock on it, and temporaries left by killed saves are
removed by the next save: only directories that carry nnx-metal's marker file, never
a user's folder that merely has a temporary's name. Files a user put into the old
artifact (a report.html) are hard-linked (or copied) into the new one before the swap, so
nothing but the old artifact's own files goes. Folders and files get the modes the
umask gives (as ``mkdir`` and ``open`` do), and a replaced directory keeps its mode.

A read holds the same lock shared, so it sees one save's files, and reads through
the directory's handle, never through a symbolic link, only regular files. No lock
is waited for longer than ``LOCK_WAIT_SECONDS``, and nothing is opened that could
block (a FIFO where a directory should be).
"""

import contextlib
import ctypes
import errno
import mmap
import os
import pathlib
import re
import secrets
import shutil
import stat
import sys
import time
from collections.abc import Callable, Iterator

from ._errors import ArtifactError

_TEMPORARY = re.compile(r"\.(?P<name>.+)\.tmp-(?P<pid>\d+)-\w+")
# In every temporary directory of a save (the new artifact, and the old one once swapped
# out) until it is gone: what tells nnx-metal's temporaries from a user's folder.
MARKER = ".nnx-metal-temporary"
# A temporary's name holds at most this much of the target's (the marker holds all of it).
_NAME_IN_TEMPORARY = 64
# The longest a save or a read waits for another's lock on the parent directory.
LOCK_WAIT_SECONDS = 30.0


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


def _temporary_name(path: pathlib.Path) -> str:
  return f".{path.name[:_NAME_IN_TEMPORARY]}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


def _mark(directory: pathlib.Path, target: pathlib.Path) -> None:
  (directory / MARKER).write_text(target.name)


def _replace(tmp: pathlib.Path, path: pathlib.Path) -> None:
  marked = stat.S_ISDIR(os.lstat(path).st_mode)  # a real directory, not a link to one
  if marked:
    _mark(path, path)  # the old directory is a temporary from the swap on
  try:
    if _exchange(tmp, path):
      return
    # Two renames: a kill between them leaves the old directory under the name below.
    aside = path.parent / _temporary_name(path)
    os.rename(path, aside)
    os.rename(tmp, path)
    os.rename(aside, tmp)
  except BaseException:
    if marked:
      with contextlib.suppress(OSError):
        os.unlink(path / MARKER)
    raise


@contextlib.contextmanager
def _locked(directory: pathlib.Path, *, shared: bool = False) -> Iterator[None]:
  """An advisory lock on ``directory``, exclusive for a save, shared for a read; waits at most LOCK_WAIT_SECONDS.

  Opening never blocks: a FIFO or anything else that is not a directory is not locked
  (the caller then finds it is no directory).
  """
  try:
    import fcntl

    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK)
  except (ImportError, OSError):  # no advisory locks here, or a folder we may not open: not serialized
    yield
    return
  try:
    deadline, pause = time.monotonic() + LOCK_WAIT_SECONDS, 0.01
    while True:
      try:
        fcntl.flock(descriptor, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        if time.monotonic() >= deadline:
          raise ArtifactError(
            f"{directory} has been locked by another process for {LOCK_WAIT_SECONDS:.0f} s (a save in "
            "progress, or a lock someone else holds); nothing was read or written. Try again, or use "
            "another directory."
          ) from None
        time.sleep(pause)
        pause = min(pause * 2, 0.5)
    yield
  finally:
    os.close(descriptor)  # releases the lock


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except (PermissionError, OverflowError):
    return True
  return True


def _remove(path: pathlib.Path) -> None:
  """Removes a directory tree (its marker last, so that a kill midway leaves it marked), or anything else
  (a file, a link, a FIFO) without opening it."""
  try:
    is_directory = stat.S_ISDIR(os.lstat(path).st_mode)
  except FileNotFoundError:
    return
  if not is_directory:
    with contextlib.suppress(OSError):
      os.unlink(path)
    return
  for folder, dirs, files in os.walk(path, topdown=False):
    for name in files:
      if not (folder == str(path) and name == MARKER):
        with contextlib.suppress(OSError):
          os.unlink(os.path.join(folder, name))
    for name in dirs:
      entry = os.path.join(folder, name)
      with contextlib.suppress(OSError):
        os.unlink(entry) if os.path.islink(entry) else os.rmdir(entry)
  with contextlib.suppress(OSError):
    os.unlink(path / MARKER)
  with contextlib.suppress(OSError):
    os.rmdir(path)


def _is_temporary_of(sibling: pathlib.Path, path: pathlib.Path) -> bool:
  """Whether ``sibling`` is a temporary a dead save of ``path`` left: named like one, a real directory, and marked
  (or holding nothing but a marker being written: a save killed between making it and marking it, or after
  emptying it)."""
  match = _TEMPORARY.fullmatch(sibling.name)
  if not match or match["name"] != path.name[:_NAME_IN_TEMPORARY] or _alive(int(match["pid"])):
    return False
  try:
    if not stat.S_ISDIR(os.lstat(sibling).st_mode):
      return False
    entries = os.listdir(sibling)
    if not entries:
      return True
    if MARKER not in entries or not stat.S_ISREG(os.lstat(sibling / MARKER).st_mode):
      return False
    marker = (sibling / MARKER).read_text()
    return marker == path.name or (entries == [MARKER] and path.name.startswith(marker))
  except (OSError, UnicodeDecodeError):
    return False


def remove_stale_temporaries(path: pathlib.Path) -> list[pathlib.Path]:
  """Removes the temporaries that killed saves of ``path`` left behind; returns them."""
  removed = []
  for sibling in path.parent.iterdir() if path.parent.is_dir() else ():
    if _is_temporary_of(sibling, path):
      _remove(sibling)
      removed.append(sibling)
  return removed


def _fsync_tree(root: pathlib.Path) -> None:
  for folder, _, files in os.walk(root):
    for name in files:
      with open(os.path.join(folder, name), "rb") as f:
        os.fsync(f.fileno())


def _keep(old: pathlib.Path, tmp: pathlib.Path, relative: str) -> None:
  """Hard-links ``old/relative`` (a user's file, link or folder, recursively) into ``tmp``: it stays after the swap."""
  source, target = old / relative, tmp / relative
  if os.path.lexists(target):
    raise ArtifactError(
      f"{source} is not a file of the artifact there, and the new artifact writes its own {relative}; "
      "nothing was written. Move it away and save again."
    )
  info = os.lstat(source)
  target.parent.mkdir(parents=True, exist_ok=True)  # a folder the new artifact lacks (spirv/ when it is for cpu)
  if stat.S_ISDIR(info.st_mode):
    os.mkdir(target, stat.S_IMODE(info.st_mode))
    for name in sorted(os.listdir(source)):
      _keep(old, tmp, f"{relative}/{name}")
    return
  try:
    try:
      os.link(source, target, follow_symlinks=False)
    except OSError:  # a file system without hard links, or another user's file (fs.protected_hardlinks)
      if stat.S_ISLNK(info.st_mode):
        os.symlink(os.readlink(source), target)
      elif stat.S_ISREG(info.st_mode):
        shutil.copy2(source, target, follow_symlinks=False)
      else:
        raise
  except OSError as e:
    raise ArtifactError(
      f"{source} is not a file of the artifact there, and it cannot be kept in the new one ({e.strerror or e}); "
      "nothing was written. Move it away and save again."
    ) from None


def save_directory(
  path: str | os.PathLike,
  write: Callable[[pathlib.Path], None],
  *,
  may_replace: Callable[[pathlib.Path], list[str]],
) -> pathlib.Path:
  """Writes a directory at ``path`` with ``write(tmp)``, atomically.

  Args:
    path: the directory to create or replace.
    write: fills the (empty) temporary directory it is given.
    may_replace: called with ``path`` when something is there already; raises to
      keep it (e.g. when it is not a previous save of the same kind), else returns
      the paths (relative to ``path``) of what is not that save's own: those are kept.

  Returns:
    ``path``.
  """
  path = pathlib.Path(path)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.parent):
      remove_stale_temporaries(path)
      tmp = path.parent / _temporary_name(path)
      os.mkdir(tmp, 0o777)  # the umask decides, as for any folder the user makes
      try:
        _mark(tmp, path)
        write(tmp)
        _fsync_tree(tmp)
        if os.path.lexists(path):
          keep = may_replace(path)
          for relative in keep:
            _keep(path, tmp, relative)
          if stat.S_ISDIR(os.lstat(path).st_mode):
            os.chmod(tmp, stat.S_IMODE(os.lstat(path).st_mode))  # a replaced directory keeps its mode
          _replace(tmp, path)
        else:
          os.rename(tmp, path)
        with contextlib.suppress(OSError):
          os.unlink(path / MARKER)
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


def _read_at(
  directory_fd: int, relative: str, limit: int | None, shown: pathlib.Path, aligned: bool
) -> bytes | memoryview:
  """Reads ``relative`` under an open directory: each folder and the file opened without following links.

  ``aligned`` reads into page-aligned memory of the process's own (an anonymous map), returned as
  a read-only view: IREE's cpu devices then use a parameter archive's values where they lie instead
  of copying them at load (they take host memory aligned to 64 bytes; a ``bytes`` object's is not).
  """
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
      if not aligned:
        return f.read()
      mapped = mmap.mmap(-1, max(info.st_size, 1))  # an anonymous map starts on a page boundary
      if f.readinto(memoryview(mapped)[: info.st_size]) != info.st_size:
        raise ArtifactError(f"{where} changed while it was read. Read it again when nothing writes to it.")
      return memoryview(mapped)[: info.st_size].toreadonly()
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
  """``read(relative, limit=None, *, aligned=False) -> bytes`` for the files of ``directory``, one save's worth.

  With ``aligned``, a read-only, page-aligned ``memoryview`` instead of ``bytes`` (see ``_read_at``).

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
      yield lambda relative, limit=None, *, aligned=False: _read_at(directory_fd, relative, limit, directory, aligned)
    finally:
      os.close(directory_fd)
