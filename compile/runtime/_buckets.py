"""Buckets: one function exported at several static sizes of a dimension, chosen by the size of the input.

IREE 3.13 does not compile every op with a dynamic dimension (convolutions with some paddings,
pooling windows, the reshapes of Flax's normalizations, attention masks): ``compile.method(...,
buckets=(1, 8, 32))`` then exports a symbolic function once per size instead, as functions
``<name>__b<size>`` that share the program's state. ``program.<name>(x)`` calls the one of x's
size. Exported with ``pad=True`` (functions ``<name>__pad<size>``), a size between buckets runs in
the next larger bucket: the extra rows are zeros, and they are cut from the outputs. Padding is
right only where rows do not mix (no batch statistics, no state updated from the whole batch),
which is why it is asked for, never assumed.
"""

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _variables
from ._errors import SignatureError
from ._pytrees import unflatten_outputs
from ._records import Tensor

if TYPE_CHECKING:  # Programs make buckets of their functions; a bucket only calls them
  from ._program import ProgramFunction

_NAME = re.compile(r"(?P<base>[A-Za-z_][A-Za-z0-9_]*?)__(?P<kind>b|pad)(?P<size>[0-9]+)")


def bucket_name(base: str, size: int, pad: bool) -> str:
  """The name of ``base``'s function for one size: ``eval__b8``, or ``eval__pad8`` where padding is allowed."""
  return f"{base}__{'pad' if pad else 'b'}{size}"


def bucket_groups(names: Iterable[str]) -> dict[str, tuple[bool, dict[int, str]]]:
  """``{base name: (pad, {size: function name})}`` of the functions named as buckets, two or more of one kind.

  ``program.<base>(x)`` calls the one of x's size (``Program.functional`` and ``nnx-metal run`` take
  the base name too).
  """
  names = list(names)
  found: dict[tuple[str, bool], dict[int, str]] = {}
  for name in names:
    match = _NAME.fullmatch(name)
    if match is not None:
      found.setdefault((match["base"], match["kind"] == "pad"), {})[int(match["size"])] = name
  return {base: (pad, members) for (base, pad), members in found.items() if len(members) > 1 and base not in names}


def groups(functions: dict[str, "ProgramFunction"]) -> dict[str, "Bucketed"]:
  """``{base name: Bucketed}`` of :func:`bucket_groups`."""
  return {
    base: Bucketed(base, [(size, functions[name]) for size, name in members.items()], pad)
    for base, (pad, members) in bucket_groups(functions).items()
  }


def _varying(shapes: Sequence[Sequence[Tensor]], sizes: Sequence[int]) -> list[tuple[int, int]]:
  """``(tensor, axis)`` of the dimensions that are the bucket's size in every bucket."""
  first = shapes[0]
  return [
    (i, axis)
    for i, tensor in enumerate(first)
    for axis in range(len(tensor.shape))
    if all(
      len(each[i].shape) == len(tensor.shape) and each[i].shape[axis] == size
      for each, size in zip(shapes, sizes, strict=True)
    )
  ]


class Bucketed:
  """A function exported at several sizes of one dimension: calls the bucket that fits the input."""

  def __init__(self, name: str, members: list[tuple[int, "ProgramFunction"]], pad: bool):
    self.name, self.pad = name, pad
    self.members = sorted(members, key=lambda member: member[0])
    self.sizes = [size for size, _ in self.members]
    specs = [function.spec for _, function in self.members]
    self._inputs = _varying([spec.inputs for spec in specs], self.sizes)
    self._outputs = _varying([spec.outputs for spec in specs], self.sizes)

  def signature(self) -> str:
    return f"{self.name}, {'padded to' if self.pad else 'at'} sizes {self.sizes}: {self.members[-1][1].signature()}"

  def _choose(self, size: int) -> tuple[int, "ProgramFunction"]:
    for bucket, function in self.members:
      if bucket == size or (self.pad and bucket > size):
        return bucket, function
    allowed = f"any size up to {self.sizes[-1]}" if self.pad else f"the sizes {self.sizes}"
    raise SignatureError(
      f"{self.name} was exported for {allowed}; this call has size {size}. Export a bucket for it "
      f"(buckets=(..., {size})){'' if self.pad else ', or pad=True where rows do not mix'}."
    )

  def __call__(self, *args: Any) -> Any:
    flat = self.members[0][1].flat_inputs(args)
    found = {np.shape(flat[i])[axis] for i, axis in self._inputs if axis < np.ndim(flat[i])}
    if len(found) != 1:
      raise SignatureError(f"{self.name}: the bucketed dimension has the sizes {sorted(found)} in one call.")
    size = found.pop()
    bucket, function = self._choose(size)
    if bucket != size:
      for i, axis in self._inputs:
        widths = [(0, 0)] * np.ndim(flat[i])
        widths[axis] = (0, bucket - size)
        flat[i] = np.pad(np.asarray(flat[i]), widths)
    leaves = function.run_flat(flat)
    for i, axis in self._outputs if bucket != size else ():
      leaves[i] = leaves[i][(slice(None),) * axis + (slice(0, size),)]
    return unflatten_outputs(function.spec.structure, leaves, _variables.known_variable_class)
