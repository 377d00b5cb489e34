"""bf16 arithmetic computed in f32, with bf16 kept as the storage type at the function boundary.

Works around an IREE 3.13 SPIR-V limitation (the ``metal`` and ``vulkan``
targets): a bf16 matrix product (``nnx.Linear(..., param_dtype=jnp.bfloat16,
dtype=jnp.bfloat16)``) does not compile: "failed to legalize operation
'vector.bitcast': (vector<4xbf16>) -> vector<2xf32>". bf16 elementwise ops,
reductions, loads and stores do compile, so :func:`widen_bfloat16` rewrites the
module, in place, to compute every bf16 value in f32:

* public functions keep their signature: bf16 arguments are converted to f32 at
  entry, and results converted back to bf16 just before ``func.return``;
* private functions (JAX's helpers, e.g. ``@relu``, ``@_where``) are retyped
  whole: signature, entry block arguments and the results of their calls;
* every other bf16 value, op results and the block arguments of nested regions
  (reduction bodies, while loops, sort comparators, branches), becomes f32;
* a bf16 ``stablehlo.constant`` stays bf16 (its dense attribute is typed) and is
  converted to f32 after, as is the result of a user's ``convert`` to bf16 (so
  ``x.astype(jnp.bfloat16)`` still rounds);
* where the module has a matrix product (``dot_general``, ``convolution``), the
  converts to and from bf16 (but a constant's, which IREE folds) are put behind
  optimization barriers: IREE would fuse them into the product's kernel, which
  would then load or store bf16 vectors and fail to compile as before.

Values between ops are no longer rounded to bf16, so results differ from eager
JAX by about bf16 rounding. Ops that read or write bf16 bits (``bitcast_convert``,
which ``jax.random`` uses to draw bf16 numbers) or hold bf16 in an attribute have
no f32 equivalent: they raise :class:`UnsupportedOpError`.
"""

from jax.extend.mlir import ir
from jax.extend.mlir.dialects import stablehlo

from .._stablehlo import frames
from ..runtime import UnsupportedOpError

# Ops whose meaning is bf16's bit layout: in f32 they would compute something else.
_BIT_LEVEL = ("stablehlo.bitcast_convert", "stablehlo.rng_bit_generator")
# Attributes that name bf16 without typing a value. A dot algorithm with bf16
# operand precision rounds its (now f32) operands to bf16: what the bf16 product did.
_NAMES_BF16_SAFELY = frozenset({("stablehlo.dot_general", "algorithm")})
# Matrix products: where IREE fuses the converts around them into their kernel.
_PRODUCTS = ("stablehlo.dot_general", "stablehlo.dot", "stablehlo.convolution")
# Ops whose regions carry whole tensors; a reduction's or sort's body computes on scalars.
_DATAFLOW = ("func.func", "stablehlo.while", "stablehlo.if", "stablehlo.case")
_HINT = (
  "IREE's SPIR-V code generation (targets metal and vulkan) cannot compile bfloat16 matrix products, "
  "so nnx-metal computes bfloat16 in float32, and this op has no float32 equivalent. Compute it in float32 "
  "(e.g. draw random numbers as float32, then .astype(jnp.bfloat16); bitcast float32 values to "
  "uint32), or compile for the cpu target."
)


def _is_bf16(value_type: ir.Type) -> bool:
  return isinstance(value_type, ir.RankedTensorType) and isinstance(value_type.element_type, ir.BF16Type)


def _widened(value_type: ir.Type) -> ir.Type:
  if not _is_bf16(value_type):
    return value_type
  # The location is for diagnostics only: a tensor of f32 is always valid.
  return ir.RankedTensorType.get(value_type.shape, ir.F32Type.get(), value_type.encoding, loc=ir.Location.unknown())


def _is_private(function: ir.Operation) -> bool:
  visibility = function.attributes["sym_visibility"] if "sym_visibility" in function.attributes else None
  return visibility is not None and ir.StringAttr(visibility).value == "private"


def _signature(function: ir.Operation) -> ir.FunctionType:
  return ir.FunctionType(ir.TypeAttr(function.attributes["function_type"]).value)


def _callee(call: ir.Operation) -> str:
  return ir.FlatSymbolRefAttr(call.attributes["callee"]).value


def _names_bf16(attr: ir.Attribute) -> bool:
  """Whether ``attr`` holds bf16 (a typed value, a type); names (strings, symbols) may spell "bf16" freely."""
  if isinstance(attr, ir.StringAttr | ir.FlatSymbolRefAttr | ir.SymbolRefAttr):
    return False
  if isinstance(attr, ir.ArrayAttr):
    return any(_names_bf16(each) for each in attr)
  if isinstance(attr, ir.DictAttr):
    return any(_names_bf16(attr[i].attr) for i in range(len(attr)))
  return "bf16" in str(attr)


def _unsupported(op: ir.Operation, what: str) -> UnsupportedOpError:
  where = ", called from ".join(frames(op.location)[:3]) or "an unknown location"
  return UnsupportedOpError(f"`{op.name}` at {where} {what}. {_HINT}")


def _defined(op: ir.Operation) -> list[ir.Value]:
  """The values ``op`` defines: its results and its regions' block arguments."""
  arguments = [arg for region in op.regions for block in region.blocks for arg in block.arguments]
  return [*op.results, *arguments]


def _check(op: ir.Operation) -> None:
  """Raises UnsupportedOpError if ``op`` holds bf16 in a way that f32 cannot stand for."""
  types = [value.type for value in _defined(op)]
  if op.name in _BIT_LEVEL and any(_is_bf16(t) for t in [*types, *(v.type for v in op.operands)]):
    raise _unsupported(op, "reads or writes the bits of a bfloat16 value")
  for value_type in types:
    if "bf16" in str(value_type) and not _is_bf16(value_type):  # tuples, quantized types
      raise _unsupported(op, f"has type {value_type}, whose bfloat16 cannot be widened")
  if op.name in ("func.func", "stablehlo.constant"):
    return  # their typed attributes are handled
  for name in op.attributes:
    if (op.name, name) not in _NAMES_BF16_SAFELY and _names_bf16(op.attributes[name]):
      raise _unsupported(op, f"has bfloat16 in its attribute {name} = {op.attributes[name]}")


def _collect(module: ir.Module) -> list[ir.Operation]:
  """Every op in the module's functions, checked: all of them before any is changed."""
  found = []

  def visit(op):
    found.append(op.operation if hasattr(op, "operation") else op)
    return ir.WalkResult.ADVANCE

  module.operation.walk(visit)
  for op in found:
    _check(op)  # out of the walk: an exception raised in its callback would come out as a RuntimeError
  return [op for op in found if op.name not in ("builtin.module", "func.func")]


def _keeps_bf16(op: ir.Operation, public: dict[str, ir.FunctionType]) -> bool:
  """Whether ``op``'s bf16 results stay bf16, converted to f32 after it, rather than being retyped."""
  if op.name == "stablehlo.constant":
    return True  # the dense attribute has the result's type
  if op.name == "stablehlo.convert":
    return not _is_bf16(op.operands[0].type)  # the user's rounding to bf16
  return op.name == "func.call" and _callee(op) in public  # a boundary like any public function's


def _in_dataflow(op: ir.Operation) -> bool:
  """Whether ``op`` is where whole tensors flow (a function, a loop or branch), not in a reduction's scalar body."""
  parent = op.parent.operation if hasattr(op.parent, "operation") else op.parent
  return parent.name in _DATAFLOW


def _isolated(value: ir.Value, isolate: bool) -> ir.Value:
  """``value`` through an optimization barrier if ``isolate``: keeps a bf16 convert out of a matrix product's kernel."""
  if not isolate or isinstance(value.owner, ir.Block):
    return value  # a block argument has no producer to fuse with
  return stablehlo.OptimizationBarrierOp([value]).results[0]


def _retype(value: ir.Value) -> int:
  if not _is_bf16(value.type):
    return 0
  value.set_type(_widened(value.type))
  return 1


def _widen_at(value: ir.Value, ip: ir.InsertionPoint, location: ir.Location, isolate: bool) -> int:
  """Routes every use of the bf16 ``value`` through a convert to f32 inserted at ``ip``."""
  if not _is_bf16(value.type) or not any(True for _ in value.uses):
    return 0
  with ip, location:
    wide = stablehlo.ConvertOp(_widened(value.type), value)
    value.replace_all_uses_except(_isolated(wide.result, isolate), wide.operation)
  return 1


def _narrow_operands(op: ir.Operation, types: list[ir.Type], isolate: bool) -> None:
  """Converts ``op``'s (now f32) operands back to bf16 where ``types`` say bf16: at a public boundary."""
  for index, value_type in enumerate(types):
    if _is_bf16(value_type):
      with ir.InsertionPoint(op), op.location:
        op.operands[index] = stablehlo.ConvertOp(value_type, _isolated(op.operands[index], isolate)).result


def _widen_op(op: ir.Operation, keeps_bf16: bool, isolate: bool) -> int:
  if not keeps_bf16:
    return sum(_retype(value) for value in _defined(op))
  isolate = isolate and _in_dataflow(op) and op.name != "stablehlo.constant"  # IREE folds a constant's convert
  if op.name == "stablehlo.convert" and _is_bf16(op.result.type):
    with ir.InsertionPoint(op), op.location:
      op.operands[0] = _isolated(op.operands[0], isolate)
  return sum(_widen_at(result, ir.InsertionPoint.after(op), op.location, isolate) for result in op.results)


def _widen_public(function: ir.Operation, isolate: bool) -> int:
  """Converts bf16 arguments to f32 at entry, and results back to bf16 at each return."""
  blocks = function.regions[0].blocks
  if not blocks:
    return 0  # a declaration
  start = ir.InsertionPoint(blocks[0].operations[0])
  count = sum(_widen_at(arg, start, function.location, isolate) for arg in blocks[0].arguments)
  for block in blocks:
    terminator = block.operations[len(block.operations) - 1]
    if terminator.name == "func.return":
      _narrow_operands(terminator, _signature(function).results, isolate)
  return count


def _widen_private(function: ir.Operation) -> int:
  """Retypes the signature and entry block; the body and the calls' results are retyped with every other op."""
  signature = _signature(function)
  widened = ir.FunctionType.get([_widened(t) for t in signature.inputs], [_widened(t) for t in signature.results])
  if widened != signature:
    function.attributes["function_type"] = ir.TypeAttr.get(widened)
  blocks = function.regions[0].blocks
  return sum(_retype(arg) for arg in blocks[0].arguments) if blocks else 0


def widen_bfloat16(module: ir.Module) -> int:
  """Computes the module's bf16 arithmetic in f32, keeping bf16 at its public functions' boundary.

  Raises UnsupportedOpError, before changing anything, for an op that has no f32
  equivalent (``bitcast_convert`` to or from bf16, bf16 in an attribute). Returns
  the number of bf16 values now carried in f32 (0: no bf16, the module is unchanged).
  """
  with module.context:
    ops = _collect(module)
    isolate = any(op.name in _PRODUCTS for op in ops)
    functions = [op.operation for op in module.body.operations if op.operation.name == "func.func"]
    public = {ir.StringAttr(f.attributes["sym_name"]).value: _signature(f) for f in functions if not _is_private(f)}
    keeps_bf16 = [_keeps_bf16(op, public) for op in ops]  # decided on the types as JAX lowered them
    count = sum(_widen_op(op, keeps, isolate) for op, keeps in zip(ops, keeps_bf16, strict=True))
    # The boundaries last, once every value they convert has its final type.
    for function in functions:
      count += _widen_private(function) if _is_private(function) else _widen_public(function, isolate)
    for call in (op for op, keeps in zip(ops, keeps_bf16, strict=True) if keeps and op.name == "func.call"):
      _narrow_operands(call, public[_callee(call)].inputs, isolate and _in_dataflow(call))
  return count
