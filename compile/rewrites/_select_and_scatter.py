"""``stablehlo.select_and_scatter`` (the gradient of max and min pooling) as slices, selects and pads.

Works around two IREE 3.13 defects, so the rewrite runs for every target:

* overlapping windows (``nnx.max_pool(x, (3, 3), strides=(2, 2))``, a ResNet stem)
  do not compile on any backend: "failed to legalize operation
  'stablehlo.select_and_scatter'";
* on the SPIR-V targets (``metal``, ``vulkan``) the kernel IREE makes for
  non-overlapping windows stores each window's selection to workgroup memory under
  one thread mapping and reads it back under another with no barrier: a data race
  (``compile/spirv/_hazards.py`` reports it).

The rewrite computes XLA's semantics with ops IREE fuses into few kernels (one for
non-overlapping windows):

1. For each offset of the window, in row-major order, a strided slice of the operand
   gives every window's element there; a running comparison with the op's own select
   function keeps the first element it selects (``GE`` keeps the first maximum), and
   the number of its offset.
2. The result is computed in a (block, phase) view of each dimension, ``position =
   block * stride + phase``, where every window offset is a broadcast: block ``b``
   takes the source value of window ``b - m`` (for ``m`` below ``ceil(window /
   stride)``) where that window chose the offset ``phase + m * stride``. A reshape
   turns the view back into the operand's shape.

Only the form JAX emits is rewritten: no padding attribute (JAX pads the operand
with -inf itself), a select body that is one ``compare`` of its two arguments, a
scatter body that adds. Any other is left to IREE.
"""

import itertools
import math

import numpy as np
from jax.extend.mlir import ir
from jax.extend.mlir.dialects import stablehlo

from .._stablehlo import int_list_attribute

# More window offsets than this would unroll into too many ops (a global pool):
# those are left to IREE, where the hazard check guards the SPIR-V targets.
MAX_WINDOW_OFFSETS = 64


def _body(op: ir.Operation, region: int) -> list[ir.Operation]:
  return [o.operation for o in op.regions[region].blocks[0].operations]


def _select_compare(op: ir.Operation) -> ir.Operation | None:
  """The select body's ``compare(selected, candidate)``, if that is all it is."""
  body = _body(op, 0)
  arguments = list(op.regions[0].blocks[0].arguments)
  if len(body) != 2 or body[0].name != "stablehlo.compare" or body[1].name != "stablehlo.return":
    return None
  if list(body[0].operands) != arguments or body[1].operands[0] != body[0].results[0]:
    return None
  return body[0]


def _scatter_adds(op: ir.Operation) -> bool:
  body = _body(op, 1)
  return len(body) == 2 and body[0].name == "stablehlo.add" and body[1].name == "stablehlo.return"


def _constant(array: np.ndarray, element_type: ir.Type) -> ir.Value:
  tensor = ir.RankedTensorType.get(list(array.shape), element_type)
  return stablehlo.ConstantOp(ir.DenseElementsAttr.get(np.ascontiguousarray(array), type=tensor)).result


def _broadcast(scalar: ir.Value, shape: list[int]) -> ir.Value:
  tensor = ir.RankedTensorType.get(shape, ir.RankedTensorType(scalar.type).element_type)
  return stablehlo.BroadcastInDimOp(tensor, scalar, []).result


def _index(value: int, shape: list[int]) -> ir.Value:
  """An i32 tensor of ``shape`` filled with ``value``."""
  return _broadcast(_constant(np.array(value, np.int32), ir.IntegerType.get_signless(32)), shape)


def _zero(element_type: ir.Type) -> ir.Value:
  """A scalar 0 of any element type (a 0 of i32 converted)."""
  scalar = _constant(np.array(0, np.int32), ir.IntegerType.get_signless(32))
  return stablehlo.ConvertOp(ir.RankedTensorType.get([], element_type), scalar).result


def _strided(value: ir.Value, start: list[int], size: list[int], strides: list[int]) -> ir.Value:
  limit = [k + (n - 1) * s + 1 for k, n, s in zip(start, size, strides, strict=True)]
  return stablehlo.SliceOp(value, start, limit, strides).result


def _select_first(op: ir.Operation, compare: ir.Operation, offsets: list[tuple[int, ...]]) -> ir.Value:
  """Which window offset each window selects (its number in ``offsets``), as XLA does, as an i32 tensor."""
  operand = op.operands[0]
  windows = list(ir.RankedTensorType(op.operands[1].type).shape)
  strides = int_list_attribute(op, "window_strides", [1] * len(windows))
  selected = _strided(operand, list(offsets[0]), windows, strides)
  chosen = _index(0, windows)
  for number, offset in enumerate(offsets[1:], start=1):
    candidate = _strided(operand, list(offset), windows, strides)
    # XLA keeps the selected element while select(selected, candidate) holds.
    kept = stablehlo.CompareOp(selected, candidate, compare.attributes["comparison_direction"])
    if "compare_type" in compare.attributes:
      kept.operation.attributes["compare_type"] = compare.attributes["compare_type"]
    replace = stablehlo.NotOp(kept.result).result
    selected = stablehlo.SelectOp(replace, candidate, selected).result
    chosen = stablehlo.SelectOp(replace, _index(number, windows), chosen).result
  return chosen


def _decompose(op: ir.Operation, compare: ir.Operation) -> None:
  operand, source, init = op.operands[0], op.operands[1], op.operands[2]
  shape = list(ir.RankedTensorType(operand.type).shape)
  windows = list(ir.RankedTensorType(source.type).shape)
  element = ir.RankedTensorType(operand.type).element_type
  index_type = ir.IntegerType.get_signless(32)
  rank = len(shape)
  window = int_list_attribute(op, "window_dimensions", [1] * rank)
  strides = int_list_attribute(op, "window_strides", [1] * rank)
  offsets = list(itertools.product(*(range(w) for w in window)))
  # The operand seen as (block, phase) per dimension: position p = block * stride + phase.
  # Window j's element at offset k sits in block j + k // stride, phase k % stride, so a
  # block gathers from the windows up to ceil(window / stride) - 1 blocks before it.
  reach = [-(-w // s) for w, s in zip(window, strides, strict=True)]
  blocks = [-(-n // s) for n, s in zip(shape, strides, strict=True)]
  expanded = [size for b, s in zip(blocks, strides, strict=True) for size in (b, s)]
  block_dimensions = [2 * d for d in range(rank)]
  with ir.InsertionPoint(op), op.location:
    chosen = _select_first(op, compare, offsets)
    # Windows moved by up to reach - 1 blocks: pad once, then slice (slices fuse, pads do not).
    grow_low = [r - 1 for r in reach]
    grow_high = [b - n for b, n in zip(blocks, windows, strict=True)]
    if any(grow_low) or any(grow_high):
      zeros = [0] * rank
      source = stablehlo.PadOp(source, _zero(element), grow_low, grow_high, zeros).result
      chosen = stablehlo.PadOp(chosen, _constant(np.array(-1, np.int32), index_type), grow_low, grow_high, zeros).result
    total = _broadcast(init, expanded)
    nothing = _broadcast(_zero(element), expanded)
    for shift in itertools.product(*(range(r) for r in reach)):
      start = [r - 1 - m for r, m in zip(reach, shift, strict=True)]
      values = [_strided(v, start, blocks, [1] * rank) for v in (source, chosen)]
      values = [
        stablehlo.BroadcastInDimOp(ir.RankedTensorType.get(expanded, v.type.element_type), v, block_dimensions).result
        for v in values
      ]
      wanted = _offset_numbers(window, strides, shift)
      wanted = stablehlo.BroadcastInDimOp(
        ir.RankedTensorType.get(expanded, index_type), _constant(wanted, index_type), [2 * d + 1 for d in range(rank)]
      ).result
      mine = stablehlo.CompareOp(values[1], wanted, stablehlo.ComparisonDirectionAttr.get("EQ")).result
      total = stablehlo.AddOp(total, stablehlo.SelectOp(mine, values[0], nothing).result).result
    flat = [b * s for b, s in zip(blocks, strides, strict=True)]
    result = stablehlo.ReshapeOp(ir.RankedTensorType.get(flat, element), total).result
    if flat != shape:
      result = stablehlo.SliceOp(result, [0] * rank, shape, [1] * rank).result
  op.results[0].replace_all_uses_with(result)
  op.erase()


def _offset_numbers(window: list[int], strides: list[int], shift: tuple[int, ...]) -> np.ndarray:
  """For each phase, the number of the window offset that lands there from ``shift`` blocks back (-1: none)."""
  numbers = np.full(strides, -1, np.int32)
  for phase in itertools.product(*(range(s) for s in strides)):
    offset = [p + m * s for p, m, s in zip(phase, shift, strides, strict=True)]
    if all(k < w for k, w in zip(offset, window, strict=True)):
      numbers[phase] = np.ravel_multi_index(offset, window)
  return numbers


def decompose_select_and_scatter(module: ir.Module) -> int:
  """Rewrites each ``select_and_scatter`` of the form JAX emits (see the module docstring); returns how many."""
  found = []

  def visit(op):
    op = op.operation if hasattr(op, "operation") else op
    if op.name == "stablehlo.select_and_scatter":
      found.append(op)
    return ir.WalkResult.ADVANCE

  module.operation.walk(visit)
  rewritten = 0
  with module.context:
    for op in found:
      compare = _select_compare(op)
      window = int_list_attribute(op, "window_dimensions", [])
      padding = int_list_attribute(op, "padding", [])
      if compare is None or not _scatter_adds(op) or any(padding) or math.prod(window) > MAX_WINDOW_OFFSETS:
        continue
      _decompose(op, compare)
      rewritten += 1
  return rewritten
