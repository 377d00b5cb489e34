"""The parameter archive (``params.irpa``): the state's initial values, one entry per variable, by global name.

IREE writes archives; opening one never hands its bytes to IREE's parser. The header
and every range in it are read and checked here, in Python's unbounded integers, before
a single value is used: IREE's parser adds 64-bit offsets that a crafted archive makes
wrap around, and then reads (or segfaults) outside the file.
"""

import pathlib
import struct

import numpy as np
from iree import runtime as rt

from . import _dtypes
from ._errors import ArtifactError
from ._file_names import PARAMS
from ._records import Variable

# iree/schemas/parameter_archive.h, version 0.0 (all little-endian, packed).
_MAGIC = b"IRPA"
_HEADER = struct.Struct("<4sHHQQQQ" + "QQ" * 3)  # magic, version, size, next header, flags, entry count, 3 ranges
_ENTRY = struct.Struct("<QIQQQQQQ")  # entry size, type, flags, name range, metadata range, minimum alignment
_DATA_ENTRY = struct.Struct("<QQ")  # storage range, after the entry header
_DATA = 2  # the entry type of data stored in the archive: the only kind nnx-metal writes
_ENTRY_ALIGNMENT = 16


def params_index(params: dict[str, np.ndarray]) -> rt.ParameterIndex:
  """A parameter index holding ``params`` (global name -> array), as IREE's parameter modules read it."""
  index = rt.ParameterIndex()
  for name, array in params.items():
    rt.parameter_index_add_numpy_ndarray(index, name, _dtypes.plain(np.ascontiguousarray(array)))
  return index


def write_params(path: pathlib.Path, params: dict[str, np.ndarray]) -> bytes:
  """Writes ``params`` as an archive at ``path``; returns the bytes written, read back and checked.

  Raises:
    ArtifactError: the archive could not be written whole (a full disk, a file-size limit).
  """
  try:
    params_index(params).create_archive_file(str(path))
    data = path.read_bytes()
  except OSError as e:
    raise ArtifactError(f"Cannot write {PARAMS}: {e.strerror or e}. Nothing was written.") from None
  except Exception as e:  # noqa: BLE001 - IREE's writer reports a full disk as IndexError or RuntimeError
    raise ArtifactError(
      f"Cannot write {PARAMS} ({type(e).__name__}: {e}); is the disk full? Nothing was written."
    ) from None
  entries = archive_entries(data)
  if set(entries) != set(params):
    raise ArtifactError(f"{PARAMS} was not written whole (is the disk full?). Nothing was written.")
  return data


def _range(data: bytes | memoryview, base: int, offset: int, length: int, what: str) -> tuple[int, int]:
  """``(start, end)`` of ``length`` bytes at ``base + offset``, which must lie inside ``data``."""
  start, end = base + offset, base + offset + length
  if not 0 <= start <= end <= len(data):
    raise ArtifactError(
      f"{PARAMS}: the {what} spans bytes {start} to {end}, outside the file's {len(data)}. "
      "The archive is corrupt or was edited; export the artifact again."
    )
  return start, end


def archive_entries(data: bytes | memoryview) -> dict[str, tuple[int, int]]:
  """``{name: (start, end)}`` of each entry's bytes in ``data``, every range checked against the file.

  Reads the archives nnx-metal writes: one version 0.0 header, data entries only.

  Raises:
    ArtifactError: anything else: another version, a linked or splatted archive, a range outside
      its segment or the file, a name twice or not UTF-8.
  """

  def corrupt(problem: str) -> ArtifactError:
    return ArtifactError(f"{PARAMS} {problem}. The archive is corrupt or was edited; export the artifact again.")

  if len(data) < _HEADER.size or bytes(data[:4]) != _MAGIC:
    raise corrupt("is not an IREE parameter archive (no IRPA header)")
  _, major, minor, header_size, next_header, _, count, *ranges = _HEADER.unpack_from(data)
  if (major, minor, header_size, next_header) != (0, 0, _HEADER.size, 0):
    raise corrupt(f"has an archive header of version {major}.{minor}, size {header_size}, next {next_header}")
  segments = {}
  names = ("entry table", "metadata segment", "storage segment")
  for what, offset, length in zip(names, ranges[::2], ranges[1::2], strict=True):
    segments[what] = _range(data, 0, offset, length, what)
  table_start, table_end = segments["entry table"]
  if count > (table_end - table_start) // _ENTRY.size:
    raise corrupt(f"claims {count} entries, more than its entry table holds")

  def inside(segment: str, offset: int, length: int, what: str) -> tuple[int, int]:
    start, end = segments[segment]
    if offset + length > end - start:
      raise corrupt(f"has a {what} of {length} bytes at {offset}, outside its {segment} of {end - start} bytes")
    return start + offset, start + offset + length

  entries, position = {}, table_start
  for index in range(count):
    if position + _ENTRY.size > table_end:
      raise corrupt(f"has an entry table that ends inside entry {index}")
    size, kind, _, name_offset, name_length, _, _, _ = _ENTRY.unpack_from(data, position)
    if kind != _DATA or size < _ENTRY.size + _DATA_ENTRY.size or position + size > table_end:
      raise corrupt(f"has entry {index} of type {kind} and size {size}, not a data entry inside the table")
    storage_offset, storage_length = _DATA_ENTRY.unpack_from(data, position + _ENTRY.size)
    start, end = inside("metadata segment", name_offset, name_length, f"name of entry {index}")
    try:
      name = bytes(data[start:end]).decode()
    except UnicodeDecodeError:
      raise corrupt(f"has entry {index} whose name is not UTF-8") from None
    if name in entries:
      raise corrupt(f"holds {name[:80]!r} twice")
    entries[name] = inside("storage segment", storage_offset, storage_length, f"value of {name[:80]!r}")
    position += -(-size // _ENTRY_ALIGNMENT) * _ENTRY_ALIGNMENT
  return entries


def read_params(data: bytes | memoryview, state: tuple[Variable, ...]) -> dict[str, np.ndarray]:
  """The state's arrays from the verified bytes of an archive, as the manifest's dtypes, sizes checked first.

  The archive is parsed from the bytes whose hash was checked, not from the file
  again, and the arrays are read-only views of those (immutable) bytes: what was
  verified is what is used, and opening holds the state's bytes once, not twice.
  """
  entries = archive_entries(data)
  expected = {v.global_name for v in state}
  if set(entries) != expected:
    extra, missing = sorted(set(entries) - expected), sorted(expected - set(entries))
    raise ArtifactError(
      f"{PARAMS} does not hold this program's state (missing {missing[:3]}, unexpected {extra[:3]}): "
      "it belongs to another export. Export the artifact again."
    )
  params = {}
  for variable in state:
    start, end = entries[variable.global_name]
    dtype = _dtypes.dtype(variable.dtype).numpy
    nbytes = variable.size * dtype.itemsize
    if end - start != nbytes:
      raise ArtifactError(
        f"{PARAMS} holds {end - start} bytes for {variable.name}, which needs {nbytes} "
        f"({variable.dtype}{list(variable.shape)}). The archive belongs to another export; export again."
      )
    params[variable.global_name] = np.frombuffer(data, dtype, count=variable.size, offset=start).reshape(variable.shape)
  return params
