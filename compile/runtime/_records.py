"""The records of a manifest: the tensors at a function's boundary, the state variables, the functions.

Frozen; each parses itself from JSON field by field (``_fields.py``) and writes itself back.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from . import _dtypes
from ._dims import Dim, dimension
from ._fields import (
  Fields,
  fail,
  integer,
  list_of,
  mapping,
  matching,
  number,
  one_of,
  optional,
  path_part,
  scalar,
  string,
)
from ._file_names import KERNEL_NAME
from ._interface import GLOBAL_NAME, IDENTIFIER, KEY_IMPLS, KEY_WORDS, path_name
from ._pytrees import structure_check, structure_leaves


@dataclasses.dataclass(frozen=True)
class Tensor:
  """An array at a function's boundary: an input (``args[0]``) or an output (``outputs[0]``).

  Attributes:
    name: what the user calls it.
    shape: its shape: sizes, or symbolic dimensions (``_dims.Dim``) of a function exported for any size.
    dtype: the numpy dtype name the user passes and gets.
    device_dtype: the dtype on the device (float64 becomes float32 on metal and vulkan).
  """

  name: str
  shape: tuple[int | Dim, ...]
  dtype: str
  device_dtype: str

  def describe(self) -> str:
    return f"{self.name}: {self.dtype}{list(self.shape)}"

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  def to_json(self) -> dict[str, Any]:
    shape = [d.to_json() if isinstance(d, Dim) else d for d in self.shape]
    return {"name": self.name, "shape": shape, "dtype": self.dtype, "device_dtype": self.device_dtype}


def _tensor_fields(fields: Fields, demote_f64: bool) -> dict[str, Any]:
  dtype = fields.get("dtype", one_of(tuple(_dtypes.DTYPES)))
  device_dtype = fields.get("device_dtype", one_of((_dtypes.device_dtype_name(dtype, demote_f64),)))
  shape = fields.get("shape", list_of(dimension, limit=64))
  return {"name": fields.get("name", string), "shape": shape, "dtype": dtype, "device_dtype": device_dtype}


def tensor_check(demote_f64: bool) -> Callable[[Any, str], Tensor]:
  def check(value, where):
    fields = Fields(value, where)
    tensor = Tensor(**_tensor_fields(fields, demote_f64))
    fields.done()
    return tensor

  return check


@dataclasses.dataclass(frozen=True)
class Variable(Tensor):
  """One state variable of the exported objects.

  Attributes:
    path: its NNX path (``("linear1", "w")``); ``name`` is the path joined with dots.
    variable_type: its ``nnx.Variable`` subclass's name (``Param``, ``BatchStat``).
    variable_class: ``module:qualname`` of that class: a description, never imported.
    global_name: its IREE global and parameter-archive key.
    metadata: the Variable's scalar metadata.
    key_impl: the PRNG implementation of a typed key (held as its key data), else None.
  """

  path: tuple[str | int, ...] = ()
  variable_type: str = ""
  variable_class: str = ""
  global_name: str = ""
  metadata: dict[str, str | int | float | bool] = dataclasses.field(default_factory=dict)
  key_impl: str | None = None

  def describe(self) -> str:
    return f"{self.name} ({self.variable_type}): {self.dtype}{list(self.shape)}"

  def to_json(self) -> dict[str, Any]:
    return {
      **super().to_json(),
      "path": list(self.path),
      "variable_type": self.variable_type,
      "variable_class": self.variable_class,
      "global": self.global_name,
      "metadata": dict(self.metadata),
      "key_impl": self.key_impl,
    }


def variable_check(demote_f64: bool) -> Callable[[Any, str], Variable]:
  def check(value, where):
    fields = Fields(value, where)
    variable = Variable(
      **_tensor_fields(fields, demote_f64),
      path=fields.get("path", list_of(path_part, limit=256)),
      variable_type=fields.get("variable_type", matching(IDENTIFIER)),
      variable_class=fields.get("variable_class", string),
      global_name=fields.get("global", matching(GLOBAL_NAME)),
      metadata=fields.get("metadata", mapping(matching(IDENTIFIER), scalar)),
      key_impl=fields.get("key_impl", optional(one_of(KEY_IMPLS))),
    )
    fields.done()
    if any(isinstance(dim, Dim) for dim in variable.shape):
      raise fail(f"{where}.shape", "must hold sizes only: state has no symbolic dimensions")
    if variable.name != path_name(variable.path):
      raise fail(f"{where}.name", f"is {variable.name!r} but its path joins to {path_name(variable.path)!r}")
    if variable.key_impl is not None and (variable.dtype, variable.shape[-1:]) != (
      "uint32",
      (KEY_WORDS[variable.key_impl],),
    ):
      raise fail(f"{where}.key_impl", f"{variable.key_impl!r} holds uint32[..., {KEY_WORDS[variable.key_impl]}] keys")
    return variable

  return check


@dataclasses.dataclass(frozen=True)
class Function:
  """One exported function of the program.

  Attributes:
    name: the function's name (``program.<name>(...)``).
    label: what it is (``__call__ (train)``, ``train_step``), for reports.
    method, mode: for a method export, the method and NNX mode it calls (reports replay it eagerly).
    inputs, outputs: its flat inputs and outputs.
    structure: the pytree shape of its return value (see ``_pytrees.py``).
    updates: the names of the state variables it writes back.
    executables: the kernels named after it (shared ones are named after their first user).
    dispatch_count: kernels it launches per call, each iteration of a loop with static bounds counted
      (a loop whose trip count is known only at run time counts once: then a lower bound).
    flops: floating-point operations per call (XLA's cost analysis), which picks the CPU driver.
  """

  name: str
  label: str
  method: str | None
  mode: str | None
  inputs: tuple[Tensor, ...]
  outputs: tuple[Tensor, ...]
  structure: dict[str, Any]
  updates: tuple[str, ...]
  executables: tuple[str, ...]
  dispatch_count: int
  flops: float = 0.0

  def signature(self) -> str:
    inputs = ", ".join(t.describe() for t in self.inputs)
    return f"{self.name}({inputs}) -> ({', '.join(t.describe() for t in self.outputs)})"

  def to_json(self) -> dict[str, Any]:
    return {
      "label": self.label,
      "method": self.method,
      "mode": self.mode,
      "inputs": [t.to_json() for t in self.inputs],
      "outputs": [t.to_json() for t in self.outputs],
      "structure": self.structure,
      "updates": list(self.updates),
      "executables": list(self.executables),
      "dispatch_count": self.dispatch_count,
      "flops": self.flops,
    }


def function_check(demote_f64: bool, state_names: frozenset[str]) -> Callable[[Any, str], Function]:
  def check(value, where, name):
    fields = Fields(value, where)
    outputs = fields.get("outputs", list_of(tensor_check(demote_f64)))
    function = Function(
      name=name,
      label=fields.get("label", string),
      method=fields.get("method", optional(string)),
      mode=fields.get("mode", optional(one_of(("train", "eval")))),
      inputs=fields.get("inputs", list_of(tensor_check(demote_f64))),
      outputs=outputs,
      structure=fields.get("structure", structure_check),
      updates=fields.get("updates", list_of(one_of(state_names))),
      executables=fields.get("executables", list_of(matching(KERNEL_NAME))),
      dispatch_count=fields.get("dispatch_count", integer),
      flops=fields.get("flops", number),
    )
    fields.done()
    if len(set(function.updates)) != len(function.updates):
      raise fail(f"{where}.updates", "names a state variable twice")
    if sorted(structure_leaves(function.structure)) != list(range(len(outputs))):
      raise fail(f"{where}.structure", f"does not hold each of the {len(outputs)} outputs exactly once")
    return function

  return check
