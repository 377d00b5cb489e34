"""StableHLO rewrites that keep IREE's code generation correct, above all SPIR-V's (``metal``, ``vulkan``).

Each rewrite works around a miscompilation of IREE 3.13 reproduced in
``tests/test_spirv_bugs.py`` (strict xfails on the raw path, so we learn when IREE
is fixed) and is described in ``docs/metal-correctness.md``. They are IR passes on
the module JAX lowered, run in place before it is printed for iree-compile, and
only for the targets whose :attr:`Target.rewrites` name them.

One is for speed, not correctness: ``kernel_gradients_as_products`` (cpu only, see
``_kernel_gradient.py`` and ``docs/benchmarks.md``).
"""

from collections.abc import Callable

from jax.extend.mlir import ir
from jax.extend.mlir.dialects import stablehlo

from ._stablehlo import SITE_TAG

_REDUCTIONS = ("stablehlo.reduce", "stablehlo.reduce_window")


def _ops_named(module: ir.Module, names: tuple[str, ...]) -> list[ir.Operation]:
  found = []

  def visit(op):
    op = op.operation if hasattr(op, "operation") else op
    if op.name in names:
      found.append(op)
    return ir.WalkResult.ADVANCE

  module.operation.walk(visit)
  return found


def _produced_by_barrier(value: ir.Value) -> bool:
  owner = value.owner
  return isinstance(owner, ir.Operation | ir.OpView) and owner.name == "stablehlo.optimization_barrier"


def _barrier_operands(op: ir.Operation, count: int) -> None:
  """Routes the first ``count`` operands of ``op`` through one optimization barrier."""
  inputs = [op.operands[i] for i in range(count)]
  if all(isinstance(v.owner, ir.Block) or _produced_by_barrier(v) for v in inputs):
    return  # function arguments or another barrier: there is no producer to fuse
  with ir.InsertionPoint(op), op.location:
    barrier = stablehlo.OptimizationBarrierOp(inputs)
  for i, value in enumerate(barrier.results):
    op.operands[i] = value


def _barrier_results(op: ir.Operation) -> None:
  """Routes every use of ``op``'s results through one optimization barrier."""
  results = list(op.results)
  uses = [[(use.owner, use.operand_number) for use in result.uses] for result in results]
  if not any(uses) or all(owner.name == "func.return" for each in uses for owner, _ in each):
    return  # returned as is: there is no consumer to fuse
  with ir.InsertionPoint.after(op), op.location:
    barrier = stablehlo.OptimizationBarrierOp(results)
  for new, each in zip(barrier.results, uses, strict=True):
    for owner, number in each:
      owner.operands[number] = new


def _isolate(op: ir.Operation) -> None:
  """Puts ``op`` in a dispatch of its own: an optimization barrier on its inputs and on its results."""
  inputs = len(op.operands) // 2 if op.name in _REDUCTIONS else len(op.operands)  # reductions: then init values
  _barrier_operands(op, inputs)
  _barrier_results(op)


def isolate_reductions(module: ir.Module) -> int:
  """Puts every reduction in a dispatch of its own: an optimization barrier on its operands and results.

  Works around two IREE 3.13 SPIR-V bugs:

  * A reduction fused with its elementwise consumers (``x - x.mean(0)``) keeps the
    reduced values in workgroup memory, written under one thread mapping and read
    under another with no barrier: garbage on lavapipe, a data race under the Metal
    and Vulkan memory models.
  * A reduction fused with a negating producer (``(-x).sum(0)``) becomes an
    ``acc - x`` combiner that the subgroup-reduce strategy (metal) rejects: "Failed
    to get an identity value for the reduction operation".

  ``stablehlo.reduce`` (single- and multi-operand, e.g. argmax) and
  ``stablehlo.reduce_window`` are covered. Returns the number of reductions isolated.
  """
  reductions = _ops_named(module, _REDUCTIONS)
  with module.context:
    for op in reductions:
      _isolate(op)
  return len(reductions)


# Ops that reduce over some dimensions: where IREE's SPIR-V code generation keeps
# partial results in workgroup memory, and where a kernel race has been seen.
_PRODUCTS = ("stablehlo.dot_general", "stablehlo.dot", "stablehlo.convolution")
CONTRACTIONS = (*_PRODUCTS, *_REDUCTIONS)


def isolate_sites(module: ir.Module, scope: str, indices: frozenset[int]) -> int:
  """Isolates the contraction ops tagged ``nnx@<scope>@<i>`` for ``i`` in ``indices`` (see ``_stablehlo.py``).

  Used where a kernel formed from them raced (a matrix product fused with its
  consumers can keep its results in workgroup memory without a barrier, like a
  reduction) or failed to compile (a data-tiled product whose fused epilogue needs
  more stack than a CPU kernel may have). Isolating every product up front would
  cost a dispatch each, so only those are. Returns the number of ops isolated.
  """
  tags = {f'"{SITE_TAG}{scope}@{i}"' for i in indices}
  chosen = [op for op in _ops_named(module, CONTRACTIONS) if str(op.location)[4:].split("(", 1)[0] in tags]
  with module.context:
    for op in chosen:
      _isolate(op)
  return len(chosen)


def _tensor_type(value: ir.Value) -> ir.RankedTensorType:
  return ir.RankedTensorType(value.type)


def _slice(value: ir.Value, dimension: int, start: int, size: int) -> ir.Value:
  shape = _tensor_type(value).shape
  begin = [start if d == dimension else 0 for d in range(len(shape))]
  end = [start + size if d == dimension else n for d, n in enumerate(shape)]
  return stablehlo.SliceOp(value, begin, end, [1] * len(shape)).result


def _with_dimension(value_type: ir.RankedTensorType, dimension: int, size: int) -> ir.RankedTensorType:
  shape = list(value_type.shape)
  shape[dimension] = size
  return ir.RankedTensorType.get(shape, value_type.element_type)


def _split_convolution(op: ir.Operation) -> None:
  """One ungrouped convolution per group, concatenated along the output features."""
  numbers = stablehlo.ConvDimensionNumbers(op.attributes["dimension_numbers"])
  lhs, rhs = op.operands[0], op.operands[1]
  features = ir.IntegerAttr(op.attributes["feature_group_count"]).value
  batches = ir.IntegerAttr(op.attributes["batch_group_count"]).value
  groups = max(features, batches)
  lhs_dimension = numbers.input_feature_dimension if features > 1 else numbers.input_batch_dimension
  lhs_size = _tensor_type(lhs).shape[lhs_dimension] // groups
  out_features = numbers.kernel_output_feature_dimension
  rhs_size = _tensor_type(rhs).shape[out_features] // groups
  attributes = {
    name: op.attributes[name]
    for name in ("window_strides", "padding", "lhs_dilation", "rhs_dilation", "window_reversal", "precision_config")
    if name in op.attributes
  }
  with ir.InsertionPoint(op), op.location:
    part_type = _with_dimension(_tensor_type(op.result), numbers.output_feature_dimension, rhs_size)
    parts = []
    for group in range(groups):
      lhs_part = _slice(lhs, lhs_dimension, group * lhs_size, lhs_size)
      rhs_part = _slice(rhs, out_features, group * rhs_size, rhs_size)
      part = stablehlo.ConvolutionOp(part_type, lhs_part, rhs_part, numbers, 1, 1)
      for name, value in attributes.items():
        part.operation.attributes[name] = value
      parts.append(part.result)
    joined = stablehlo.ConcatenateOp(parts, numbers.output_feature_dimension).result
  op.result.replace_all_uses_with(joined)
  op.erase()


def _is_grouped(op: ir.Operation) -> bool:
  """1 < feature groups < input features, or batch groups > 1; depthwise convolutions compile correctly."""
  numbers = stablehlo.ConvDimensionNumbers(op.attributes["dimension_numbers"])
  features = ir.IntegerAttr(op.attributes["feature_group_count"]).value
  batches = ir.IntegerAttr(op.attributes["batch_group_count"]).value
  in_features = _tensor_type(op.operands[0]).shape[numbers.input_feature_dimension]
  return 1 < features < in_features or batches > 1


def split_grouped_convolutions(module: ir.Module) -> int:
  """Rewrites grouped convolutions as one ungrouped convolution per group.

  Works around an IREE 3.13 SPIR-V bug: a grouped convolution (``nnx.Conv(...,
  feature_group_count=2)``) zero-fills its output under one thread mapping and
  accumulates into it under another, with no barrier, and returns zeros or partial
  sums. Depthwise convolutions (one group per input feature) are not affected.
  Returns the number of convolutions split.
  """
  grouped = [op for op in _ops_named(module, ("stablehlo.convolution",)) if _is_grouped(op)]
  with module.context:
    for op in grouped:
      _split_convolution(op)
  return len(grouped)


def widen_bfloat16(module: ir.Module) -> int:
  """bf16 arithmetic computed in f32, bf16 kept for storage at the boundary (see ``_bfloat16.py``)."""
  from ._bfloat16 import widen_bfloat16 as widen

  return widen(module)


def decompose_select_and_scatter(module: ir.Module) -> int:
  """Max and min pooling's gradient as slices, selects and pads (see ``_select_and_scatter.py``)."""
  from ._select_and_scatter import decompose_select_and_scatter as decompose

  return decompose(module)


def kernel_gradients_as_products(module: ir.Module) -> int:
  """A convolution's kernel gradient as one matrix product over gathered windows (see ``_kernel_gradient.py``)."""
  from ._kernel_gradient import kernel_gradients_as_products as rewrite

  return rewrite(module)


REWRITES: dict[str, Callable[[ir.Module], int]] = {
  "widen_bfloat16": widen_bfloat16,
  "decompose_select_and_scatter": decompose_select_and_scatter,
  "kernel_gradients_as_products": kernel_gradients_as_products,
  "isolate_reductions": isolate_reductions,
  "split_grouped_convolutions": split_grouped_convolutions,
}


def apply(module: ir.Module, names: tuple[str, ...]) -> dict[str, int]:
  """Runs the rewrites ``names`` on ``module`` in place; returns how many ops each changed."""
  return {name: REWRITES[name](module) for name in names}
