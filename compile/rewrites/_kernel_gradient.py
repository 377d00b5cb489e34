"""A convolution's kernel gradient as one matrix product over gathered windows (im2col).

JAX computes the gradient of ``conv(x, kernel)`` with respect to the kernel as another
convolution, of ``x`` by the output gradient ``g``: its window is the whole output image
(16x16, say) and its output is the kernel's few positions (3x3). IREE 3.13 compiles that
into a direct convolution loop, 5 to 19 times slower than XLA on the CPU
(docs/benchmarks.md), the bulk of a convnet's train step.

Here it becomes what it is, a sum over (batch, image) of products of ``x`` and ``g``:
for each kernel position a strided slice of the padded ``x`` gathers the pixels that
position meets; the slices are concatenated and contracted with ``g`` in one
``dot_general``, which IREE compiles into its packed matrix-product kernels. For kernel
position ``p``, output-gradient position ``w`` and padding ``low``, the pixel is
``x[p * stride + w * rhs_dilation - low]``.

For the cpu target only: IREE makes a kernel of each gathered slice (11 for a 3x3
kernel instead of 2), which costs microseconds on a CPU and a launch each on a GPU.

Only convolutions whose window (the output-gradient image) is larger than their output
(the kernel) are rewritten, with no input dilation, window reversal or groups, and at
most ``MAX_KERNEL_POSITIONS`` kernel positions: forward convolutions are left as they are.
"""

import itertools
import math

from jax.extend.mlir import ir
from jax.extend.mlir.dialects import stablehlo

from .._stablehlo import int_list_attribute

MAX_KERNEL_POSITIONS = 64


def _flags(op: ir.Operation, name: str) -> list[bool]:
  if name not in op.attributes:
    return []
  attribute = op.attributes[name]
  if isinstance(attribute, ir.DenseBoolArrayAttr):
    return list(attribute)
  return [bool(v) for v in ir.DenseElementsAttr(attribute)]


def _is_kernel_gradient(op: ir.Operation) -> bool:
  numbers = stablehlo.ConvDimensionNumbers(op.attributes["dimension_numbers"])
  spatial = len(numbers.input_spatial_dimensions)
  rhs_shape = ir.RankedTensorType(op.operands[1].type).shape
  out_shape = ir.RankedTensorType(op.result.type).shape
  window = [rhs_shape[d] for d in numbers.kernel_spatial_dimensions]
  positions = [out_shape[d] for d in numbers.output_spatial_dimensions]
  padding = int_list_attribute(op, "padding", [0] * 2 * spatial)
  return (
    ir.IntegerAttr(op.attributes["feature_group_count"]).value == 1
    and ir.IntegerAttr(op.attributes["batch_group_count"]).value == 1
    and all(d == 1 for d in int_list_attribute(op, "lhs_dilation", [1] * spatial))
    and not any(_flags(op, "window_reversal"))
    and all(p >= 0 for p in padding)
    and math.prod(window) > math.prod(positions)
    and math.prod(positions) <= MAX_KERNEL_POSITIONS
    and ir.RankedTensorType(op.operands[0].type).element_type == ir.RankedTensorType(op.result.type).element_type
  )


def _rewrite(op: ir.Operation) -> None:
  numbers = stablehlo.ConvDimensionNumbers(op.attributes["dimension_numbers"])
  x, g = op.operands[0], op.operands[1]
  x_type, out_type = ir.RankedTensorType(x.type), ir.RankedTensorType(op.result.type)
  element, rank = x_type.element_type, x_type.rank
  spatial = len(numbers.input_spatial_dimensions)
  window = [ir.RankedTensorType(g.type).shape[d] for d in numbers.kernel_spatial_dimensions]
  positions = [out_type.shape[d] for d in numbers.output_spatial_dimensions]
  strides = int_list_attribute(op, "window_strides", [1] * spatial)
  dilation = int_list_attribute(op, "rhs_dilation", [1] * spatial)
  padding = int_list_attribute(op, "padding", [0] * 2 * spatial)
  with ir.InsertionPoint(op), op.location:
    if any(padding):
      low, high = [0] * rank, [0] * rank
      for i, d in enumerate(numbers.input_spatial_dimensions):
        low[d], high[d] = padding[2 * i], padding[2 * i + 1]
      zero = stablehlo.ConvertOp(ir.RankedTensorType.get([], element), _i32_zero()).result
      x = stablehlo.PadOp(x, zero, low, high, [0] * rank).result
    padded = list(ir.RankedTensorType(x.type).shape)
    slices = []
    for position in itertools.product(*(range(p) for p in positions)):
      start, limit, step = [0] * rank, list(padded), [1] * rank
      for i, d in enumerate(numbers.input_spatial_dimensions):
        start[d] = position[i] * strides[i]
        limit[d] = start[d] + (window[i] - 1) * dilation[i] + 1
        step[d] = dilation[i]
      part = stablehlo.SliceOp(x, start, limit, step).result
      shape = [1, *ir.RankedTensorType(part.type).shape]
      slices.append(stablehlo.ReshapeOp(ir.RankedTensorType.get(shape, element), part).result)
    gathered = slices[0] if len(slices) == 1 else stablehlo.ConcatenateOp(slices, 0).result
    # Contract (batch, image) of the gathered pixels with (batch, image) of the output gradient:
    # the result is [kernel positions, input features, output features].
    contracted_x = [1 + numbers.input_feature_dimension, *(1 + d for d in numbers.input_spatial_dimensions)]
    contracted_g = [numbers.kernel_input_feature_dimension, *numbers.kernel_spatial_dimensions]
    dot_numbers = stablehlo.DotDimensionNumbers.get(
      lhs_batching_dimensions=[],
      rhs_batching_dimensions=[],
      lhs_contracting_dimensions=contracted_x,
      rhs_contracting_dimensions=contracted_g,
    )
    features = out_type.shape[numbers.output_batch_dimension]
    outputs = out_type.shape[numbers.output_feature_dimension]
    flat = ir.RankedTensorType.get([math.prod(positions), features, outputs], element)
    product = stablehlo.DotGeneralOp(flat, gathered, g, dot_numbers).result
    grid = ir.RankedTensorType.get([*positions, features, outputs], element)
    result = stablehlo.ReshapeOp(grid, product).result
    # The grid's dimensions are (positions..., features, outputs); put each where the op's output has it.
    source = {d: i for i, d in enumerate(numbers.output_spatial_dimensions)}
    source[numbers.output_batch_dimension] = spatial
    source[numbers.output_feature_dimension] = spatial + 1
    permutation = [source[d] for d in range(out_type.rank)]
    if permutation != list(range(out_type.rank)):
      result = stablehlo.TransposeOp(result, permutation).result
  op.result.replace_all_uses_with(result)
  op.erase()


def _i32_zero() -> ir.Value:
  i32 = ir.IntegerType.get_signless(32)
  return stablehlo.ConstantOp(
    ir.DenseElementsAttr.get_splat(ir.RankedTensorType.get([], i32), ir.IntegerAttr.get(i32, 0))
  ).result


def kernel_gradients_as_products(module: ir.Module) -> int:
  """Rewrites each kernel-gradient convolution (see the module docstring); returns how many."""
  found = []

  def visit(op):
    op = op.operation if hasattr(op, "operation") else op
    if op.name == "stablehlo.convolution" and _is_kernel_gradient(op):
      found.append(op)
    return ir.WalkResult.ADVANCE

  module.operation.walk(visit)
  with module.context:
    for op in found:
      _rewrite(op)
  return len(found)
