"""The element types an artifact may hold: numpy dtype, IREE HAL element type, MLIR type, and f64 demotion.

Everything that turns a dtype name read from a file into a memory layout goes
through this table, so a manifest can only name types whose size and layout are known.
"""

import dataclasses

import ml_dtypes
import numpy as np
from iree import runtime as rt

from ._errors import StateMismatchError

_HAL = rt.HalElementType


@dataclasses.dataclass(frozen=True)
class DType:
  """One element type.

  Attributes:
    numpy: the numpy dtype (bfloat16 and float8 from ml_dtypes).
    hal: the HAL element type host arrays of it are passed as.
    accepted: the HAL element types (as ints, which buffer views report) a device
      result of it may have (IREE's integer results are often signless: INT_32).
    mlir: its MLIR element type (unsigned integers are ``ui32``; IREE declares them signless with this
      type as their encoding).
  """

  numpy: np.dtype
  hal: "rt.HalElementType"
  accepted: frozenset
  mlir: str


def _entry(numpy_type, hal, mlir: str, *signless) -> DType:
  return DType(np.dtype(numpy_type), hal, frozenset(int(t) for t in (hal, *signless)), mlir)


DTYPES: dict[str, DType] = {
  "bool": _entry(np.bool_, _HAL.BOOL_8, "i1", _HAL.INT_8, _HAL.UINT_8, _HAL.SINT_8),
  "int8": _entry(np.int8, _HAL.SINT_8, "i8", _HAL.INT_8),
  "int16": _entry(np.int16, _HAL.SINT_16, "i16", _HAL.INT_16),
  "int32": _entry(np.int32, _HAL.SINT_32, "i32", _HAL.INT_32),
  "int64": _entry(np.int64, _HAL.SINT_64, "i64", _HAL.INT_64),
  "uint8": _entry(np.uint8, _HAL.UINT_8, "ui8", _HAL.INT_8),
  "uint16": _entry(np.uint16, _HAL.UINT_16, "ui16", _HAL.INT_16),
  "uint32": _entry(np.uint32, _HAL.UINT_32, "ui32", _HAL.INT_32),
  "uint64": _entry(np.uint64, _HAL.UINT_64, "ui64", _HAL.INT_64),
  "float16": _entry(np.float16, _HAL.FLOAT_16, "f16"),
  "bfloat16": _entry(ml_dtypes.bfloat16, _HAL.BFLOAT_16, "bf16"),
  "float32": _entry(np.float32, _HAL.FLOAT_32, "f32"),
  "float64": _entry(np.float64, _HAL.FLOAT_64, "f64"),
  "complex64": _entry(np.complex64, _HAL.COMPLEX_64, "complex<f32>"),
  "complex128": _entry(np.complex128, _HAL.COMPLEX_128, "complex<f64>"),
  "float8_e4m3fn": _entry(ml_dtypes.float8_e4m3fn, _HAL.FLOAT_8_E4M3_FN, "f8E4M3FN"),
  "float8_e5m2": _entry(ml_dtypes.float8_e5m2, _HAL.FLOAT_8_E5M2, "f8E5M2"),
}

# What a target that demotes f64 (metal, vulkan) holds on the device instead.
DEMOTED = {"float64": "float32", "complex128": "complex64"}


def dtype(name: str) -> DType:
  """The entry called ``name``; KeyError for a name outside :data:`DTYPES`."""
  return DTYPES[name]


def device_dtype_name(name: str, demote_f64: bool) -> str:
  """The dtype an array of dtype ``name`` has on a device that does (not) demote f64."""
  return DEMOTED.get(name, name) if demote_f64 else name


def hal_name(element_type: int) -> str:
  """The name of a HAL element type a buffer view reports."""
  try:
    return rt.HalElementType(element_type).name.lower()
  except ValueError:
    return f"element type {element_type:#x}"


def native(array: np.ndarray) -> np.ndarray:
  """``array`` in native byte order (a big-endian float32 array is still float32)."""
  return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


def plain(array: np.ndarray) -> np.ndarray:
  """ml_dtypes arrays (bfloat16, float8) as unsigned integers of their size, which iree.runtime can copy."""
  return array.view(f"u{array.dtype.itemsize}") if array.dtype.kind == "V" else array


def as_array(value, what: str, error: type = StateMismatchError) -> np.ndarray:
  """``value`` as a numpy array of numbers in native byte order: a typed PRNG key as its key data.

  Raises:
    error: ``value`` is no array of one of :data:`DTYPES` (an object array, None, a ragged list).
  """
  if type(value).__module__.startswith("jax") and "key<" in str(getattr(value, "dtype", "")):
    import jax  # only a jax value gets here: jax is imported already

    value = jax.random.key_data(value)
  try:
    array = native(np.asarray(value))
  except (TypeError, ValueError) as e:
    raise error(f"{what} is no array ({type(e).__name__}: {e}).") from None
  if array.dtype.name not in DTYPES:
    raise error(f"{what}: got an array of {array.dtype}{list(array.shape)}, which no program takes.")
  return array
