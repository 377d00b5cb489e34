"""The parameter archive (``params.irpa``): the state's initial values, one entry per variable, by global name."""

from typing import Any

import numpy as np
from iree import runtime as rt

from . import _dtypes
from ._errors import ArtifactError
from ._file_names import PARAMS
from ._records import Variable


def params_index(params: dict[str, np.ndarray]) -> rt.ParameterIndex:
  """A parameter index holding ``params`` (global name -> array), as IREE's parameter modules read it."""
  index = rt.ParameterIndex()
  for name, array in params.items():
    rt.parameter_index_add_numpy_ndarray(index, name, _dtypes.plain(np.ascontiguousarray(array)))
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
