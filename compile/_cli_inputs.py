"""The ``--input`` values of ``nnx-metal run`` and ``build``: parsed and checked against a signature, nothing allocated.

8x2xf32          zeros (for ``build``: the shape and dtype of an example input)
8x2xf32=0.5      filled with 0.5
@x.npy           an array saved with ``np.save`` (its header is read first)
"""

import contextlib
import dataclasses
import math
import os
import re
import stat
import warnings
from collections.abc import Iterator
from typing import Any, BinaryIO

import numpy as np

from .runtime import SignatureError

# Element type suffixes of --input, as iree-run-module spells them.
_DTYPES = {
  "f16": "float16",
  "bf16": "bfloat16",
  "f32": "float32",
  "f64": "float64",
  "i1": "bool",
  "i8": "int8",
  "i16": "int16",
  "i32": "int32",
  "i64": "int64",
  "u8": "uint8",
  "u16": "uint16",
  "u32": "uint32",
  "u64": "uint64",
}
_SUFFIXES = {dtype: suffix for suffix, dtype in _DTYPES.items()}
_DIMENSION = re.compile(r"[0-9]+")
_INTEGER = re.compile(r"[+-]?[0-9]+")
# The largest dimension and element count an --input may have (an artifact's manifest holds no larger dimension).
_MAX_SIZE = 1 << 40
_MAX_MESSAGE = 400


class UsageError(Exception):
  """A mistake on the command line, reported as one line with a hint."""


def first_line(error: BaseException) -> str:
  """``Type: first line of the message`` of an exception, at most a few hundred characters."""
  try:
    message = str(error)
  except Exception:  # an exception class of the user's whose __str__ fails
    message = ""
  lines = [line.strip() for line in message.splitlines() if line.strip()]
  text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
  return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def parse_shape(spec: str, option: str = "--input") -> tuple[tuple[int, ...], str]:
  """``3x2xf32`` -> ``((3, 2), "float32")``; ``f32`` is a scalar.

  Raises:
    UsageError: a missing or unknown element type, or a dimension that is not an integer in [0, 2**40].
  """
  if not spec:
    raise UsageError(f"{option} '' is empty; give a shape such as 8x2xf32 (f32 alone is a scalar)")
  *dims, element = spec.split("x")
  if element not in _DTYPES:
    problem = "ends without an element type" if not element else f"has unknown element type {element!r}"
    raise UsageError(f"{option} {spec!r} {problem}; end it with one of {', '.join(_DTYPES)}, as in 8x2xf32")
  shape = []
  for dim in dims:
    if dim.startswith("-") and _DIMENSION.fullmatch(dim[1:]):
      raise UsageError(f"{option} {spec!r}: dimension {dim} is negative; dimensions must be >= 0, as in 8x2xf32")
    if not _DIMENSION.fullmatch(dim):
      raise UsageError(
        f"{option} {spec!r}: dimension {dim!r} is not an integer; dimensions must be integers >= 0, as in 8x2xf32"
      )
    if len(dim.lstrip("0")) > 13 or int(dim) > _MAX_SIZE:  # 13 digits: no int() of a 5000-digit string
      shown = dim if len(dim) <= 20 else f"{dim[:8]}...({len(dim)} digits)"
      raise UsageError(f"{option} {spec!r}: dimension {shown} is larger than 2**40, the largest an artifact holds")
    shape.append(int(dim))
  if math.prod(shape) > _MAX_SIZE:
    raise UsageError(f"{option} {spec!r} has {math.prod(shape)} elements, more than 2**40; check the dimensions")
  return tuple(shape), _DTYPES[element]


def _fill(spec: str, text: str, dtype: str) -> bool | int | float:
  """The fill value ``text`` of ``--input spec``, checked against ``dtype``."""
  if not text:
    raise UsageError(f"--input {spec!r}: no fill value after '='; give a number, as in 8x2xf32=0.5 (no '=' for zeros)")
  if dtype == "bool":
    value = {"0": False, "1": True, "false": False, "true": True}.get(text.lower())
    if value is None:
      raise UsageError(f"--input {spec!r}: the fill value {text!r} is not a bool; use 0, 1, false or true")
    return value
  if dtype.startswith(("int", "uint")):
    if not _INTEGER.fullmatch(text):
      raise UsageError(f"--input {spec!r}: the fill value {text!r} is not an integer, which {dtype} needs")
    info = np.iinfo(dtype)
    if len(text.lstrip("+-0")) > 20 or not info.min <= int(text) <= info.max:
      shown = text if len(text) <= 30 else f"{text[:12]}...({len(text)} characters)"
      raise UsageError(f"--input {spec!r}: the fill value {shown} is out of range for {dtype} [{info.min}, {info.max}]")
    return int(text)
  try:
    value = float(text)
  except ValueError:
    raise UsageError(f"--input {spec!r}: the fill value {text!r} is not a number, as in 8x2xf32=0.5") from None
  with np.errstate(over="ignore"):
    rounded = float(np.asarray(value).astype(dtype))
  written_infinite = text.strip().lstrip("+-").lower() in ("inf", "infinity", "nan")
  if not math.isfinite(rounded) and not written_infinite:  # float("1e999") is inf too
    raise UsageError(f"--input {spec!r}: the fill value {text} is out of range for {dtype}")
  return value


@dataclasses.dataclass(frozen=True)
class InputValue:
  """One ``--input`` of ``run``, parsed without allocating its array (see :meth:`array`).

  Attributes:
    spec: what the user wrote.
    shape, dtype: the array's shape and numpy dtype name.
    fill: the value of every element (``3x2xf32=0.5``); unused for a file.
    path: the ``.npy`` file of ``@x.npy``, else None.
  """

  spec: str
  shape: tuple[int, ...]
  dtype: str
  fill: bool | int | float = 0
  path: str | None = None

  def describe(self) -> str:
    return f"{self.dtype}{list(self.shape)}"

  def array(self) -> np.ndarray:
    """The array: filled, or read from the ``.npy`` file (checked against its header)."""
    if self.path is None:
      return np.full(self.shape, self.fill, dtype=self.dtype)
    with open_regular_file(self.spec, self.path) as f:
      try:
        array = np.load(f, allow_pickle=False)
      except OSError as e:
        raise UsageError(f"--input {self.spec!r}: cannot read {self.path} ({e.strerror or e})") from None
      except MemoryError:
        raise UsageError(f"--input {self.spec!r}: {self.path} is too large to read into memory") from None
      except Exception as e:  # numpy's reader on the user's bytes: whatever it raises, the file is corrupt
        raise UsageError(f"--input {self.spec!r}: {self.path} is a corrupt .npy file ({first_line(e)})") from None
    if not isinstance(array, np.ndarray) or array.shape != self.shape or array.dtype.name != self.dtype:
      raise UsageError(f"--input {self.spec!r}: {self.path} changed while nnx-metal read it; try again")
    return array


_FILE_KINDS = {stat.S_IFDIR: "Is a directory", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}


@contextlib.contextmanager
def open_regular_file(spec: str, path: str) -> Iterator[BinaryIO]:
  """``path`` opened for reading if it is a regular file: a FIFO, device or directory is refused, never waited on."""
  try:
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
  except OSError as e:
    raise UsageError(f"--input {spec!r}: cannot read {path} ({e.strerror or e})") from None
  kind = stat.S_IFMT(os.fstat(descriptor).st_mode)
  if kind != stat.S_IFREG:
    os.close(descriptor)
    why = _FILE_KINDS.get(kind, "not a regular file")
    raise UsageError(f"--input {spec!r}: cannot read {path} ({why}); pass a .npy file saved with np.save")
  os.set_blocking(descriptor, True)
  with os.fdopen(descriptor, "rb") as f:
    yield f


def _npy_header(spec: str, path: str) -> tuple[tuple[int, ...], np.dtype]:
  """The shape and dtype a ``.npy`` file declares, read from its header only; checks the data is all there."""
  with open_regular_file(spec, path) as f:
    try:
      magic = f.read(6)
      if magic.startswith(b"PK\x03\x04"):
        raise UsageError(f"--input {spec!r}: {path} is a .npz archive; pass one array saved with np.save")
      if magic != b"\x93NUMPY":
        raise UsageError(f"--input {spec!r}: {path} is not a .npy file; save the array with np.save")
      f.seek(0)
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # headers written by Python 2 warn
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
          raise UsageError(
            f"--input {spec!r}: {path} is a .npy file of format version {version[0]}.{version[1]}, which "
            "nnx-metal does not read; save a plain numeric array with np.save"
          )
        shape, _, dtype = read_header[version](f)
      data_bytes = os.fstat(f.fileno()).st_size - f.tell()
    except UsageError:
      raise
    except OSError as e:
      raise UsageError(f"--input {spec!r}: cannot read {path} ({e.strerror or e})") from None
    except Exception as e:  # numpy's header parser on the user's bytes (ValueError, tokenize.TokenError, ...)
      raise UsageError(f"--input {spec!r}: {path} is a corrupt .npy file ({first_line(e)}); save it again") from None
  if all(isinstance(d, int) and d >= 0 for d in shape) and not dtype.hasobject:
    needed = math.prod(shape) * dtype.itemsize
    if data_bytes < needed:
      raise UsageError(
        f"--input {spec!r}: {path} is truncated: its header declares {dtype.name}{list(shape)} ({needed} bytes) "
        f"but it holds {data_bytes} bytes of data; save it again"
      )
  return tuple(shape), dtype


def parse_input(spec: str) -> InputValue:
  """``3x2xf32=0.5`` (filled), ``@x.npy`` (a file) or ``3x2xf32`` (zeros), parsed; nothing is allocated."""
  if spec.startswith("@"):
    path = spec[1:]
    if not path:
      raise UsageError("--input '@' names no file; write @x.npy")
    shape, dtype = _npy_header(spec, path)
    return InputValue(spec, shape, dtype.name, path=path)
  shape_spec, equals, fill = spec.partition("=")
  shape, dtype = parse_shape(shape_spec)
  return InputValue(spec, shape, dtype, _fill(spec, fill, dtype) if equals else 0)


def parse_value(spec: str) -> np.ndarray:
  """``3x2xf32=0.5`` (filled), ``@x.npy`` (loaded) or ``3x2xf32`` (zeros) -> an array."""
  return parse_input(spec).array()


def _example(tensor: Any) -> str:
  """An --input that matches ``tensor`` (a manifest Tensor)."""
  suffix = _SUFFIXES.get(tensor.dtype)
  return "x".join([*map(str, tensor.shape), suffix]) if suffix else "@x.npy"


def _fits(shape: tuple[int, ...], exported: tuple) -> bool:
  """``shape`` has the exported rank and sizes; a symbolic dimension's bounds are the Program's to check."""
  return len(shape) == len(exported) and all(type(d) is not int or d == n for n, d in zip(shape, exported, strict=True))


def check_inputs(function: Any, values: list[InputValue]) -> None:
  """Checks the ``--input`` values against ``function``'s signature (a manifest Function) before any is allocated.

  Raises:
    SignatureError: another number of inputs, or a shape or dtype other than the exported one.
  """
  expected = function.inputs
  if len(values) != len(expected):
    example = " ".join(f"--input {_example(t)}" for t in expected) or "no --input"
    raise SignatureError(
      f"{function.name} takes {len(expected)} input(s), got {len(values)} --input: {function.signature()}. "
      f"Pass one --input per input, in order, e.g. {example}."
    )
  for value, tensor in zip(values, expected, strict=True):
    if not _fits(value.shape, tensor.shape) or value.dtype != tensor.dtype:
      raise SignatureError(
        f"{function.name} input {tensor.name}: expected {tensor.dtype}{list(tensor.shape)}, got {value.describe()} "
        f"from --input {value.spec!r}. The exported signature is {function.signature()}; pass matching inputs, "
        f"e.g. --input {_example(tensor)}."
      )
