"""A function's inputs as the user passes them, matched to its flat exported inputs by JAX's rules.

An exported function was traced at example inputs: any pytree of arrays (tuples, lists,
dicts, NamedTuples, an ``nnx.State``), flattened into the module's flat inputs, each named
by its path (``args[1]['x']``, ``args[0].loss``). A call passes the same structure; this
module walks it beside those names, so that an error says which input is wrong and what
was expected there (not a flat count). Each leaf then follows JAX's rules for ``jax.jit``
with its default ``jax_enable_x64=False`` (see :func:`leaf_array`): Python scalars are
weakly typed, 64-bit arrays are taken as their 32-bit type, and a typed PRNG key is
passed as its key data.
"""

import ast
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import _dims, _dtypes
from ._errors import SignatureError
from ._records import Tensor

_TOKEN = re.compile(r"\[(\d+)\]|\[('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")\]|\.([A-Za-z_][A-Za-z0-9_]*)")


class _Attribute(str):
  """A ``.name`` step of a path (a NamedTuple field, a dataclass field, a Variable's value)."""


def _tokens(name: str) -> list | None:
  """``args[0]['x'].loss`` as ``[0, 'x', _Attribute('loss')]``; None where ``name`` is not such a path."""
  if not name.startswith("args"):
    return None
  tokens, position = [], 4
  while position < len(name):
    match = _TOKEN.match(name, position)
    if match is None:
      return None
    index, key, attribute = match.groups()
    tokens.append(int(index) if index is not None else ast.literal_eval(key) if key else _Attribute(attribute))
    position = match.end()
  return tokens or None


def input_tree(tensors: Sequence[Tensor]) -> dict | None:
  """The inputs' structure as nested dicts ``{step: subtree or input index}``; None if a name is no path."""
  root: dict = {}
  for index, tensor in enumerate(tensors):
    tokens = _tokens(tensor.name)
    if tokens is None:
      return None
    node = root
    for token in tokens[:-1]:
      node = node.setdefault(token, {})
      if not isinstance(node, dict):
        return None
    if tokens[-1] in node:
      return None
    node[tokens[-1]] = index
  return root if sorted(k for k in root if isinstance(k, int)) == list(range(len(root))) else None


def describe(node: Any, tensors: Sequence[Tensor]) -> str:
  """The structure ``node`` expects, e.g. ``(float32[4, 2], {'x': int32[]})``."""
  if isinstance(node, int):
    tensor = tensors[node]
    return f"{tensor.dtype}{list(tensor.shape)}"
  parts = [describe(node[key], tensors) for key in node]
  if all(isinstance(key, _Attribute) for key in node):
    return "(" + ", ".join(f"{key}={part}" for key, part in zip(node, parts, strict=True)) + ")"
  if all(type(key) is int for key in node):
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"
  return "{" + ", ".join(f"{key!r}: {part}" for key, part in zip(node, parts, strict=True)) + "}"


def _kind(value: Any) -> str:
  if isinstance(value, list | tuple):
    return f"a {type(value).__name__} of {len(value)}"
  if isinstance(value, Mapping):
    return f"a {type(value).__name__} with keys {list(value)[:6]}"
  shape = getattr(value, "shape", None)
  return f"{getattr(value, 'dtype', type(value).__name__)}{list(shape)}" if shape is not None else type(value).__name__


def _is_container(value: Any) -> bool:
  return isinstance(value, list | tuple | Mapping) or hasattr(value, "__dataclass_fields__")


def match(node: Any, value: Any, where: str, tensors: Sequence[Tensor], leaves: list) -> None:
  """Puts the leaves of ``value`` (what the user passed at ``where``) at their input indices in ``leaves``."""
  if isinstance(node, int):
    if _is_container(value):
      raise SignatureError(
        f"{where}: expected an array {describe(node, tensors)}, got {_kind(value)}. JAX takes a list, tuple or dict "
        "as a pytree of separate inputs, not as one array: pass np.asarray(...)."
      )
    if not (hasattr(type(value), "dtype") or type(value) in _SCALAR_KINDS):  # type: an Rngs has every attribute
      raise SignatureError(f"{where}: expected {describe(node, tensors)}, got {type(value).__name__}.")
    leaves[node] = value
    return
  expected = describe(node, tensors)
  keys = list(node)
  if all(isinstance(key, _Attribute) for key in keys):
    if key_missing := next((key for key in keys if not hasattr(value, key)), None):
      raise SignatureError(f"{where}: expected {expected}, got {_kind(value)} (it has no .{key_missing}).")
    for key in keys:
      child = getattr(value, key) if key != "value" or not hasattr(value, "get_value") else value.get_value()
      match(node[key], child, f"{where}.{key}", tensors, leaves)
  elif all(type(key) is int for key in keys) and isinstance(value, list | tuple):
    if len(value) != len(keys):
      raise SignatureError(f"{where}: expected {len(keys)} items {expected}, got {_kind(value)}.")
    for key in keys:
      match(node[key], value[key], f"{where}[{key}]", tensors, leaves)
  elif isinstance(value, Mapping) or (hasattr(value, "keys") and hasattr(value, "__getitem__")):
    got = list(value.keys())
    if set(got) != set(keys):
      missing, extra = [k for k in keys if k not in got], [k for k in got if k not in node]
      raise SignatureError(f"{where}: expected {expected}; missing keys {missing}, unexpected keys {extra}.")
    for key in keys:
      match(node[key], value[key], f"{where}[{key!r}]", tensors, leaves)
  else:
    raise SignatureError(f"{where}: expected {expected}, got {_kind(value)}.")


# JAX with jax_enable_x64=False (its default) takes 64-bit arrays as their 32-bit types.
_X64_OFF = {"float64": "float32", "int64": "int32", "uint64": "uint32", "complex128": "complex64"}
# What a Python scalar may become (JAX's weak types): a bool only a bool, an int any number, a float a float.
_SCALAR_KINDS = {bool: "b", int: "biufc", float: "fc", complex: "c"}


def leaf_array(value: Any, tensor: Tensor, what: str, sizes: dict[str, int]) -> np.ndarray:
  """``value`` as ``tensor``'s dtype, by jax.jit's rules (x64 off), after checking its shape.

  A Python bool, int, float or complex is weakly typed: it becomes a scalar of the
  tensor's dtype where JAX would promote it so (an int to a float, not a float to an
  int; an int that does not fit is refused). A float64, int64, uint64 or complex128 array
  is taken as float32, int32, uint32, complex64. A typed key is taken as its key data.
  A symbolic dimension takes the size it has here (``sizes`` holds those bound so far).
  """
  want = _dtypes.dtype(tensor.dtype).numpy
  if type(value) is np.ndarray and value.dtype == want and value.shape == tensor.shape:
    return value  # the hot path: exactly what was exported (native byte order, static shape)
  if type(value) in _SCALAR_KINDS:
    if tensor.shape != () or (want.kind if want.kind in "biufc" else "f") not in _SCALAR_KINDS[type(value)]:
      raise SignatureError(f"{what} {tensor.name}: expected {tensor.dtype}{list(tensor.shape)}, got {value!r:.40}.")
    if want.kind in "iu" and not np.iinfo(want).min <= value <= np.iinfo(want).max:
      raise SignatureError(f"{what} {tensor.name}: {value} does not fit in {tensor.dtype}.")
    return np.asarray(value, want)
  array = _dtypes.as_array(value, f"{what} {tensor.name}", SignatureError)
  if _X64_OFF.get(array.dtype.name) == tensor.dtype:
    array = array.astype(want)
  if array.dtype.name != tensor.dtype or not _dims.bind(tensor.shape, array.shape, sizes, f"{what} {tensor.name}"):
    raise SignatureError(
      f"{what} {tensor.name}: expected {tensor.dtype}{list(tensor.shape)}, got {array.dtype.name}{list(array.shape)}."
    )
  return array
