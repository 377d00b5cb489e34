"""Which memory slots an index expression of a SPIR-V kernel can reach, for each invocation.

An index is read as a linear form: a part that depends on which invocation runs it
(``64 * LocalInvocationId.x``), plus loop counters and constants whose range is known
from the loop's start, step and bound, narrowed by the branch conditions that hold
where the access is (``counter != 0`` in the ``else`` of ``if counter == 0``). Two
accesses with the same invocation part whose other parts stay within less than the
stride between invocations never touch another invocation's slots: a thread
reading back what it wrote in an earlier iteration (IREE's scan kernels) is no race.

Imports only the standard library, like ``_spirv``.
"""

import dataclasses
import itertools
from typing import Any

from ._reader import Function, Instruction, Module, Op

# Builtins whose value differs between the invocations of one dispatch.
_PER_INVOCATION = frozenset({26, 27, 28, 29, 40, 41})  # WorkgroupId .. SubgroupLocalInvocationId
_UNIFORM_IN_WORKGROUP = frozenset({26})  # WorkgroupId
_LOCAL_INVOCATION_ID, _GLOBAL_INVOCATION_ID, _LOCAL_INVOCATION_INDEX = 27, 28, 29
_ISUB, _SHIFT_LEFT, _COMPOSITE_EXTRACT = 130, 196, 81
_CONVERSIONS = frozenset({113, 114, 124})  # UConvert, SConvert, Bitcast
_EQUAL, _NOT_EQUAL = 170, 171
_GREATER = frozenset({172, 173})  # unsigned, signed
_GREATER_EQUAL = frozenset({174, 175})
_LESS = frozenset({176, 177})
_LESS_EQUAL = frozenset({178, 179})
# A comparison that fails is its negation that holds: == and !=, > and <=, >= and <.
_NEGATION = {_EQUAL: _NOT_EQUAL, _NOT_EQUAL: _EQUAL, 172: 178, 173: 179, 174: 176, 175: 177}
_NEGATION |= {178: 172, 179: 173, 176: 174, 177: 175}


@dataclasses.dataclass(frozen=True)
class Slots:
  """The slots one access reaches: ``sum(coefficient * id) + [low, high]`` for each invocation.

  Attributes:
    invocation: ``((builtin atom, coefficient), ...)``: the part that depends on the invocation.
    low, high: the range of the rest (loop counters and constants).
  """

  invocation: tuple[tuple[Any, int], ...]
  low: int
  high: int


def never_meet_across_invocations(a: Slots, b: Slots, local_size: tuple[int, int, int]) -> bool:
  """Whether no invocation's slots of ``a`` are another invocation's slots of ``b`` in one workgroup.

  Holds when both have the same invocation part and that part tells every two invocations
  of a workgroup of ``local_size`` apart by at least ``stride`` slots, while the rest of
  both stays within fewer than ``stride`` consecutive slots. Builtins that are the same
  for the whole workgroup (``WorkgroupId``) cancel out; a part built from anything but
  the local (or global) invocation id, or one that two invocations share, proves nothing.
  """
  if not a.invocation or a.invocation != b.invocation:
    return False
  coefficients = _coefficient_per_dimension(a.invocation, local_size)
  if coefficients is None:
    return False
  stride = _distinct_by_at_least(coefficients, local_size)
  return stride is not None and max(a.high, b.high) - min(a.low, b.low) < stride


def _coefficient_per_dimension(invocation, local_size) -> list[int] | None:
  """The coefficient of each local id dimension in ``invocation``, or None if another builtin varies it."""
  coefficients = [0, 0, 0]
  for (_, builtin, components), coefficient in invocation:
    if builtin in _UNIFORM_IN_WORKGROUP:
      continue
    if builtin in (_LOCAL_INVOCATION_ID, _GLOBAL_INVOCATION_ID) and len(components) == 1 and components[0] < 3:
      # GlobalInvocationId is WorkgroupId * size (the same in a workgroup) plus LocalInvocationId.
      coefficients[components[0]] += coefficient
    elif builtin == _LOCAL_INVOCATION_INDEX and not components:
      x, y, _ = local_size
      for dimension, weight in enumerate((1, x, x * y)):
        coefficients[dimension] += coefficient * weight
    else:
      return None  # subgroup ids and the like: invocations may share a value
  return coefficients


def _distinct_by_at_least(coefficients: list[int], local_size) -> int | None:
  """The least distance between the values of ``sum(c * id)`` for two invocations, if they never coincide.

  Sorted by size, each coefficient must exceed the whole span of the smaller ones
  (``|c[k+1]| >= |c[k]| * size[k]``): then any two invocations differ by at least the
  smallest coefficient.
  """
  used = sorted((abs(c), size) for c, size in zip(coefficients, local_size, strict=True) if size > 1)
  if any(c == 0 for c, _ in used) or not used:
    return None  # a dimension that does not move the slot: its invocations share it
  for (c, size), (next_c, _) in itertools.pairwise(used):
    if next_c < c * size:
      return None
  return used[0][0]


def _signed(word: int) -> int:
  return word - (1 << 32) if word >= 1 << 31 else word


class IndexRanges:
  """The slots of index expressions of one function (see the module docstring)."""

  def __init__(self, module: Module, function: Function):
    self.module = module
    self._block_of_phi = {
      instruction.result_id: block.label
      for block in function.blocks
      for instruction in block.instructions
      if instruction.opcode == Op.Phi
    }
    self._headers = {block.label: block for block in function.blocks}
    self._facts = _branch_facts(function)
    self._memo: dict[int, tuple[dict[Any, int], int] | None] = {}

  def slots(self, index: int, block: int) -> Slots | None:
    """The slots index ``index`` reaches in block ``block``, or None where it cannot tell."""
    form = self._linear(index)
    if form is None:
      return None
    terms, constant = form
    invocation = tuple(sorted(((a, c) for a, c in terms.items() if a[0] == "builtin"), key=repr))
    low = high = constant
    for atom, coefficient in terms.items():
      if atom[0] == "builtin":
        continue
      bounds = self._counter_range(atom, block) if atom[0] == "counter" else None
      if bounds is None:
        return None
      ends = (coefficient * bounds[0], coefficient * bounds[1])
      low, high = low + min(ends), high + max(ends)
    return Slots(invocation, low, high)

  def _linear(self, value: int) -> tuple[dict[Any, int], int] | None:
    if value not in self._memo:
      self._memo[value] = None  # a cycle through a phi reads as "not linear"
      self._memo[value] = self._compute(value)
    return self._memo[value]

  def _compute(self, value: int) -> tuple[dict[Any, int], int] | None:
    instruction = self.module.definitions.get(value)
    if instruction is None:
      return None
    op, operands = instruction.opcode, instruction.operands
    if op == Op.Constant and len(operands) == 1:
      return {}, _signed(operands[0])
    if op == Op.Phi:
      return {("counter", value): 1}, 0
    if op in _CONVERSIONS:
      return self._linear(operands[0])
    if op == _COMPOSITE_EXTRACT:
      builtin = self._builtin(operands[0])
      return ({("builtin", builtin, operands[1:]): 1}, 0) if builtin in _PER_INVOCATION else None
    if op == Op.Load:
      builtin = self.module.builtins.get(operands[0])
      return ({("builtin", builtin, ()): 1}, 0) if builtin in _PER_INVOCATION else None
    if op in (Op.IAdd, _ISUB):
      return _combine(self._linear(operands[0]), self._linear(operands[1]), 1 if op == Op.IAdd else -1)
    if op in (Op.IMul, _SHIFT_LEFT):
      return self._scaled(op, operands)
    return None

  def _scaled(self, op: int, operands: tuple[int, ...]) -> tuple[dict[Any, int], int] | None:
    a, b = self._linear(operands[0]), self._linear(operands[1])
    if a is None or b is None:
      return None
    if op == _SHIFT_LEFT:
      return _scale(a, 1 << b[1]) if not b[0] and 0 <= b[1] < 32 else None
    if not b[0]:
      return _scale(a, b[1])
    return _scale(b, a[1]) if not a[0] else None

  def _builtin(self, value: int) -> int | None:
    instruction = self.module.definitions.get(value)
    if instruction is None or instruction.opcode != Op.Load:
      return None
    return self.module.builtins.get(instruction.operands[0])

  def _counter_range(self, atom: Any, block: int) -> tuple[int, int] | None:
    """A loop counter's range: start, step and bound of its loop, narrowed by the conditions true in ``block``."""
    phi = atom[1]
    header = self._headers.get(self._block_of_phi.get(phi))
    definition = self.module.definitions[phi]
    incoming = [self._linear(v) for v in definition.operands[0::2]]
    starts = [form[1] for form in incoming if form is not None and not form[0]]
    steps = [form[1] for form in incoming if form is not None and form[0] == {atom: 1}]
    if header is None or len(starts) != 1 or len(steps) != 1 or steps[0] <= 0:
      return None
    bound = self._bound(phi, header.instructions[-1])
    if bound is None:
      return None
    low, high = starts[0], bound
    for condition, holds in self._facts.get(block, {}).items():
      low, high = self._narrow(phi, condition, holds, low, high)
    return (low, high) if low <= high else None

  def _bound(self, phi: int, terminator: Instruction) -> int | None:
    """The last value of a counting-up loop, from its header's ``counter < bound`` (or ``<=``)."""
    if terminator.opcode != Op.BranchConditional:
      return None
    condition = self.module.definitions.get(terminator.operands[0])
    compared = self._compared(phi, condition)
    if compared is None:
      return None
    op, constant = compared
    if op in _LESS:
      return constant - 1
    if op in _LESS_EQUAL:
      return constant
    return None

  def _compared(self, phi: int, condition: Instruction | None) -> tuple[int, int] | None:
    """``(comparison, constant)`` for ``counter <op> constant`` (a reversed comparison is turned around)."""
    if condition is None or len(condition.operands) != 2:
      return None
    left, right = (self._linear(v) for v in condition.operands)
    counter = {("counter", phi): 1}
    if left is not None and right is not None and left == (counter, 0) and not right[0]:
      return condition.opcode, right[1]
    if left is not None and right is not None and right == (counter, 0) and not left[0]:
      flipped = {172: 176, 173: 177, 174: 178, 175: 179, 176: 172, 177: 173, 178: 174, 179: 175}
      return flipped.get(condition.opcode, condition.opcode), left[1]
    return None

  def _narrow(self, phi: int, condition_id: int, holds: bool, low: int, high: int) -> tuple[int, int]:
    compared = self._compared(phi, self.module.definitions.get(condition_id))
    if compared is None:
      return low, high
    op, c = compared
    if not holds:
      op = _NEGATION.get(op, op)
    if op == _EQUAL:
      return max(low, c), min(high, c)
    if op == _NOT_EQUAL:
      return (low + 1 if c == low else low), (high - 1 if c == high else high)
    if op in _LESS:
      return low, min(high, c - 1)
    if op in _LESS_EQUAL:
      return low, min(high, c)
    if op in _GREATER:
      return max(low, c + 1), high
    if op in _GREATER_EQUAL:
      return max(low, c), high
    return low, high


def _combine(a, b, sign: int):
  if a is None or b is None:
    return None
  terms = dict(a[0])
  for atom, coefficient in b[0].items():
    terms[atom] = terms.get(atom, 0) + sign * coefficient
  return {atom: c for atom, c in terms.items() if c}, a[1] + sign * b[1]


def _scale(form, factor: int):
  terms, constant = form
  return ({atom: c * factor for atom, c in terms.items() if c * factor}, constant * factor)


def _dominators(function: Function) -> dict[int, set[int]]:
  labels = [block.label for block in function.blocks]
  predecessors: dict[int, list[int]] = {label: [] for label in labels}
  for block in function.blocks:
    for successor in block.successors:
      predecessors.setdefault(successor, []).append(block.label)
  entry = labels[0]
  dominators = {label: set(labels) for label in labels}
  dominators[entry] = {entry}
  changed = True
  while changed:
    changed = False
    for label in labels[1:]:
      incoming = [dominators[p] for p in predecessors[label] if p in dominators]
      new = set.intersection(*incoming) | {label} if incoming else {label}
      if new != dominators[label]:
        dominators[label], changed = new, True
  return dominators


def _branch_facts(function: Function) -> dict[int, dict[int, bool]]:
  """``{block: {condition: holds}}`` from the selections and loops that enclose each block."""
  dominators = _dominators(function)
  facts: dict[int, dict[int, bool]] = {block.label: {} for block in function.blocks}
  for block in function.blocks:
    merges = [i for i in block.instructions if i.opcode in (Op.SelectionMerge, Op.LoopMerge)]
    terminator = block.instructions[-1]
    if not merges or terminator.opcode != Op.BranchConditional:
      continue
    merge = merges[0].operands[0]
    condition, taken, other = terminator.operands[:3]
    for target, holds in ((taken, True), (other, False)):
      if target == merge or taken == other:
        continue
      for label, dominated_by in dominators.items():
        if target in dominated_by and merge not in dominated_by:
          facts[label][condition] = holds
  return facts
