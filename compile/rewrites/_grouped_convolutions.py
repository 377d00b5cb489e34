"""Grouped convolutions as one ungrouped convolution per group (IREE 3.13's SPIR-V races on grouped ones)."""

from jax.extend.mlir import ir
from jax.extend.mlir.dialects import stablehlo

from ._isolation import ops_named


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
  grouped = [op for op in ops_named(module, ("stablehlo.convolution",)) if _is_grouped(op)]
  with module.context:
    for op in grouped:
      _split_convolution(op)
  return len(grouped)
