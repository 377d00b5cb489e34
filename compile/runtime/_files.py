"""Saving a directory so that readers find the old one or the new one, whole, and never lose what was there.

A save writes a hidden sibling directory, then swaps it with the target in one atomic
step (``renameat2(RENAME_EXCHANGE)`` on Linux, ``renamex_np(RENAME_SWAP)`` on macOS)
and deletes the old one only after the swap: a process killed at any point leaves
either the old or the new directory in place. Saves into one parent directory are
serialized with an advisory lock on it, and temporaries left by killed saves are
removed by the next save.
"""

import contextlib
import ctypes
import os
import pathlib
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator

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
def _locked(directory: pathlib.Path) -> Iterator[None]:
  try:
    import fcntl
  except ImportError:  # no advisory locks here: saves into one directory are not serialized
    yield
    return
  descriptor = os.open(directory, os.O_RDONLY)
  try:
    fcntl.flock(descriptor, fcntl.LOCK_EX)
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


def remove_stale_temporaries(path: pathlib.Path) -> list[pathlib.Path]:
  """Removes the temporaries that killed saves of ``path`` left behind; returns them."""
  removed = []
  for sibling in path.parent.iterdir() if path.parent.is_dir() else ():
    match = _TEMPORARY.fullmatch(sibling.name)
    if match and match["name"] == path.name and not _alive(int(match["pid"])):
      shutil.rmtree(sibling, ignore_errors=True)
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
      if tmp.is_symlink() or tmp.is_file():
        tmp.unlink()
      else:
        shutil.rmtree(tmp, ignore_errors=True)  # the old directory after a swap, or the failed new one
  return path
