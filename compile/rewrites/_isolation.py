"""Ops in dispatches of their own: optimization barriers around reductions, and around chosen contractions.

A barrier on an op's operands and results keeps IREE from fusing it with its
producers and consumers, where IREE 3.13's SPIR-V code generation races or refuses.
"""

from jax.extend.mlir import ir
from jax.extend.mlir.dialects import stablehlo

from .._stablehlo import SITE_TAG

_REDUCTIONS = ("stablehlo.reduce", "stablehlo.reduce_window")


def ops_named(module: ir.Module, names: tuple[str, ...]) -> list[ir.Operation]:
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
  reductions = ops_named(module, _REDUCTIONS)
  with module.context:
    for op in reductions:
      _isolate(op)
  return len(reductions)


# The StableHLO ops whose kernels export may isolate: products, and reductions (where IREE's SPIR-V code
# generation keeps partial results in workgroup memory, and where kernel races have been seen).
CONTRACTIONS = ("stablehlo.dot_general", "stablehlo.dot", "stablehlo.convolution", *_REDUCTIONS)


def isolate_sites(module: ir.Module, scope: str, indices: frozenset[int]) -> int:
  """Isolates the contraction ops tagged ``nnx@<scope>@<i>`` for ``i`` in ``indices`` (see ``_stablehlo.py``).

  Used where a kernel formed from them raced (a matrix product fused with its
  consumers can keep its results in workgroup memory without a barrier, like a
  reduction) or failed to compile (a data-tiled product whose fused epilogue needs
  more stack than a CPU kernel may have). Isolating every product up front would
  cost a dispatch each, so only those are. Returns the number of ops isolated.
  """
  tags = {f'"{SITE_TAG}{scope}@{i}"' for i in indices}
  chosen = [op for op in ops_named(module, CONTRACTIONS) if str(op.location)[4:].split("(", 1)[0] in tags]
  with module.context:
    for op in chosen:
      _isolate(op)
  return len(chosen)
