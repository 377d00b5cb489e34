"""Atomic writes: a directory appears complete or not at all, never half-written."""

import contextlib
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields a temporary directory beside ``path`` that replaces ``path`` on success.

  On an exception the temporary directory is removed and ``path`` is untouched.
  An existing ``path`` is moved aside first and deleted only after the rename.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
  try:
    yield tmp
    old = None
    if path.exists():
      old = path.with_name(f".{path.name}.old-{os.getpid()}")
      os.rename(path, old)
    os.rename(tmp, path)
    if old is not None:
      shutil.rmtree(old)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
