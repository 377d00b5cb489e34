"""Finds data races in SPIR-V kernels: loads of memory another invocation may have stored to, with no barrier between.

Why: IREE 3.13's SPIR-V code generation, which the ``metal`` and ``vulkan`` targets
share, can write workgroup or storage-buffer memory under one mapping of threads to
elements and read it back under another in the same dispatch, without an
``OpControlBarrier`` (``threadgroup_barrier`` in Metal). Such a kernel is wrong
under the Vulkan and Metal memory models whatever a given GPU happens to do; on
Mesa's lavapipe it returns garbage (see ``docs/metal-correctness.md``).

The check, per entry point:

1. A forward dataflow over the control-flow graph (loops included) tracks the stores
   to Workgroup and StorageBuffer memory made since the last execution barrier of
   workgroup scope or wider.
2. Every load and store gets an address: its variable and the index expressions that
   lead to it, in a canonical form that is equal for equal computations, whichever
   instructions compute them. A loop counter is described by its start, its step and
   the comparisons that bound it; thread and workgroup ids by their BuiltIn.
3. A load whose address differs from that of a pending store to the same variable
   may read a slot another invocation wrote: that is reported. Reading back the very
   slot one stored to (the same address expression) is not, nor is a load whose last
   index provably stays in slots only this invocation can reach (``_slots``: a scan
   kernel reading ``a[64 * tid + i - 1]`` after storing ``a[64 * tid + i]``).

The check reasons about the invocations of one workgroup, which a barrier orders;
that workgroups own disjoint slots of a storage buffer is the invariant of IREE's
distribution and is taken as given. Expressions it cannot bound are reported, and
two bindings of one buffer are not known to alias. Atomics and
function calls are not followed (IREE's kernels have neither).

Imports only the standard library, like ``_spirv``.
"""

import collections
import dataclasses
import sys
from typing import Any

from ._reader import Function, Instruction, Module, Op, Scope, SpirvError, StorageClass, read
from ._slots import IndexRanges, Slots, never_meet_across_invocations

CHECKED_MEMORY = (StorageClass.Workgroup, StorageClass.StorageBuffer, StorageClass.CrossWorkgroup)

_CONSTANTS = frozenset({Op.ConstantTrue, Op.ConstantFalse, Op.Constant, Op.ConstantComposite, Op.ConstantNull})
_CHAINS = frozenset({Op.AccessChain, Op.InBoundsAccessChain, Op.PtrAccessChain, Op.InBoundsPtrAccessChain})
_COMMUTATIVE = frozenset({Op.IAdd, Op.IMul, 166, 167, 168, 170, 171, 197, 198, 199})  # + * logical and/or/eq, bitwise
# Integer comparisons (OpIEqual .. OpSLessThanEqual): how a loop counter is bounded.
_COMPARISONS = frozenset(range(170, 180))
# Opcodes whose operands from this position on are literals, not ids.
_LITERALS_FROM = {79: 2, 81: 1, 82: 2, 12: 1}  # VectorShuffle, CompositeExtract, CompositeInsert, ExtInst
_BUILTIN_NAMES = {24: "NumWorkgroups", 26: "WorkgroupId", 27: "LocalInvocationId", 28: "GlobalInvocationId"}
_BUILTIN_NAMES |= {29: "LocalInvocationIndex", 40: "SubgroupId", 41: "SubgroupLocalInvocationId"}

Address = tuple[int, tuple[Any, ...]]  # (variable id, canonical index path)


@dataclasses.dataclass(frozen=True)
class Race:
  """A load that may read what another invocation stored, with no barrier in between.

  Attributes:
    entry_point: the kernel's name.
    memory: the storage class, ``Workgroup`` or ``StorageBuffer``.
    variable: the variable's debug name (e.g. ``__workgroup_mem__3``).
    store: the stored slot, as an index expression.
    load: the loaded slot, as an index expression.
  """

  entry_point: str
  memory: str
  variable: str
  store: str
  load: str

  def describe(self) -> str:
    return (
      f"{self.entry_point} loads {self.memory} memory {self.variable}[{self.load}] after storing "
      f"{self.variable}[{self.store}] with no barrier in between, so it may read a slot another invocation "
      "is still writing"
    )


class _Canonical:
  """Canonical, comparable forms of the values of one module (see the module docstring)."""

  def __init__(self, module: Module):
    self.module = module
    self.uses: dict[int, list[Instruction]] = collections.defaultdict(list)
    for function in module.functions:
      for block in function.blocks:
        for instruction in block.instructions:
          for word in instruction.operands:
            self.uses[word].append(instruction)
    self._memo: dict[tuple, Any] = {}
    self._active: list[int] = []  # loop phis whose form is being computed

  def value(self, id_: int) -> Any:
    memo_key = (id_, tuple(self._active))
    if memo_key not in self._memo:
      self._memo[memo_key] = self._compute(id_)
    return self._memo[memo_key]

  def _compute(self, id_: int) -> Any:
    instruction = self.module.definitions.get(id_)
    if instruction is None or instruction.opcode in (Op.FunctionParameter, Op.Variable):
      return ("id", id_)
    op = instruction.opcode
    if op in _CONSTANTS:
      return ("const", instruction.type_id, instruction.operands)
    if op == Op.Phi:
      return self._phi(instruction)
    if op == Op.Load:
      builtin = self.module.builtins.get(instruction.operands[0])
      # A builtin input is the same value wherever it is loaded; any other load is its own value.
      return ("builtin", builtin) if builtin is not None else ("load", id_)
    literal_from = _LITERALS_FROM.get(op, len(instruction.operands))
    ids = [self.value(w) for w in instruction.operands[:literal_from]]
    if op in _COMMUTATIVE:
      ids.sort(key=repr)
    return (op, instruction.type_id, tuple(ids), instruction.operands[literal_from:])

  def _phi(self, phi: Instruction) -> Any:
    if phi.result_id in self._active:  # the back edge of a loop: refer to the counter by nesting depth
      return ("recurrence", len(self._active) - 1 - self._active.index(phi.result_id))
    self._active.append(phi.result_id)
    try:
      incoming = sorted((self.value(v) for v in phi.operands[0::2]), key=repr)
      bounds = sorted(
        (
          (use.opcode, use.operands.index(phi.result_id), self.value(other))
          for use in self.uses[phi.result_id]
          if use.opcode in _COMPARISONS
          for other in use.operands
          if other != phi.result_id
        ),
        key=repr,
      )
      return ("phi", tuple(incoming), tuple(bounds))
    finally:
      self._active.pop()

  def address(self, pointer: int) -> Address | None:
    """The variable and canonical index path of a pointer; None if it is not rooted in a variable."""
    path: list[Any] = []
    while True:
      instruction = self.module.definitions.get(pointer)
      if instruction is None:
        return None
      if instruction.opcode == Op.Variable:
        return pointer, tuple(path)
      if instruction.opcode in _CHAINS:
        base, *indices = instruction.operands
        step = [self.value(i) for i in indices]
        if instruction.opcode in (Op.PtrAccessChain, Op.InBoundsPtrAccessChain):
          step[0] = ("element", step[0])
        path = step + path
        pointer = base
      elif instruction.opcode == Op.CopyObject:
        pointer = instruction.operands[0]
      else:
        return None

  def storage_class(self, variable: int) -> int:
    return self.module.definitions[variable].operands[0]

  def last_index(self, pointer: int) -> int | None:
    """The id of the last index of the access chain that makes ``pointer``, if it is one."""
    instruction = self.module.definitions.get(pointer)
    if instruction is None or instruction.opcode not in _CHAINS or len(instruction.operands) < 2:
      return None
    return instruction.operands[-1]


def _is_workgroup_barrier(module: Module, barrier: Instruction) -> bool:
  scope = module.definitions.get(barrier.operands[0])
  if scope is None or scope.opcode != Op.Constant:
    return True  # a scope computed at run time: take it as a barrier, never invent a race
  return scope.operands[0] <= Scope.Workgroup


@dataclasses.dataclass(frozen=True)
class _Access:
  """A checked load or store: its variable, index path, and the slots its last index reaches (see _slots.py)."""

  variable: int
  path: tuple[Any, ...]
  slots: Slots | None

  def may_read_another_invocations(self, store: "_Access", local_size: tuple[int, int, int] | None) -> bool:
    """Whether this load may read a slot another invocation of the workgroup wrote with ``store``.

    ``local_size`` is the entry point's workgroup size (None if unknown). As for identical
    indices, the check reasons about the invocations of one workgroup (a barrier orders
    only those); that workgroups own disjoint slots of a storage buffer is the invariant
    of IREE's distribution, which it takes as given.
    """
    if store.variable != self.variable or store.path == self.path:
      return False  # another variable, or the very slot this invocation wrote
    if local_size is None or store.path[:-1] != self.path[:-1] or None in (self.slots, store.slots):
      return True
    return not never_meet_across_invocations(self.slots, store.slots, local_size)


class _Dataflow:
  """Pending stores (since the last barrier) at the start of every block of one function."""

  def __init__(self, module: Module, function: Function, canonical: _Canonical):
    self.module, self.function, self.canonical = module, function, canonical
    self.ranges = IndexRanges(module, function)
    self._incoming: dict[int, frozenset] = {block.label: frozenset() for block in function.blocks}

  def access(self, instruction: Instruction, block: int) -> _Access | None:
    pointer = instruction.operands[0]
    address = self.canonical.address(pointer)
    if address is None or self.canonical.storage_class(address[0]) not in CHECKED_MEMORY:
      return None
    last_index = self.canonical.last_index(pointer)
    slots = self.ranges.slots(last_index, block) if last_index is not None else None
    return _Access(address[0], address[1], slots)

  def transfer(self, block, pending: frozenset, on_load=None) -> frozenset:
    pending = set(pending)
    for instruction in block.instructions:
      if instruction.opcode == Op.ControlBarrier and _is_workgroup_barrier(self.module, instruction):
        pending.clear()
      elif instruction.opcode == Op.Store:
        access = self.access(instruction, block.label)
        if access is not None:
          pending.add(access)
      elif instruction.opcode == Op.Load and on_load is not None:
        access = self.access(instruction, block.label)
        if access is not None:
          on_load(access, pending)
    return frozenset(pending)

  def solve(self) -> dict[int, frozenset]:
    blocks = {block.label: block for block in self.function.blocks}
    worklist = collections.deque(blocks)
    while worklist:
      block = blocks[worklist.popleft()]
      out = self.transfer(block, self._incoming[block.label])
      for successor in block.successors:
        merged = self._incoming[successor] | out
        if merged != self._incoming[successor]:
          self._incoming[successor] = merged
          worklist.append(successor)
    return self._incoming


_INFIX = {128: "+", 130: "-", 132: "*", 134: "/", 135: "/", 137: "%", 139: "%", 194: ">>", 195: ">>", 196: "<<"}
_INFIX |= {197: "|", 198: "^", 199: "&"}
_COMPARISON_SIGNS = {170: "==", 171: "!=", 172: ">", 173: ">", 174: ">=", 175: ">=", 176: "<", 177: "<", 178: "<="}
_COMPARISON_SIGNS |= {179: "<="}


def render(value: Any) -> str:
  """A canonical value as a readable expression, e.g. ``LocalInvocationId.x * 4 + counter(0, +1, < 16)``."""
  kind = value[0]
  if kind == "const":
    return str(value[2][0]) if len(value[2]) == 1 else "const"
  if kind == "builtin":
    return _BUILTIN_NAMES.get(value[1], f"builtin{value[1]}")
  if kind == "phi":
    start, *steps = [render(v) for v in value[1]]
    bounds = [f"{_COMPARISON_SIGNS.get(op, '?')} {render(other)}" for op, _, other in value[2]]
    return f"counter({', '.join([start, *steps, *bounds])})"
  if kind == "recurrence":
    return "itself"
  if kind in ("load", "id"):
    return f"%{value[1]}"
  opcode, _, operands, literals = value
  if opcode in _INFIX and len(operands) == 2:
    return f"({render(operands[0])} {_INFIX[opcode]} {render(operands[1])})"
  if opcode == 81 and len(literals) == 1 and literals[0] < 4:  # OpCompositeExtract
    return f"{render(operands[0])}.{'xyzw'[literals[0]]}"
  return f"op{opcode}({', '.join(render(v) for v in operands)})"


def _describe_path(path: tuple[Any, ...]) -> str:
  # The first index of a buffer or workgroup variable selects the struct member: always 0.
  indices = path[1:] if path and path[0][0] == "const" else path
  text = "][".join(render(index) for index in indices)
  return text if len(text) <= 200 else text[:197] + "..."


def find_races(binary: bytes) -> list[Race]:
  """The races of every entry point of a SPIR-V module (one per variable and entry point).

  Raises:
    SpirvError: ``binary`` is not a well-formed SPIR-V module.
  """
  try:
    return _find_races(binary)
  except (IndexError, KeyError, ValueError, RecursionError) as e:
    if isinstance(e, SpirvError):
      raise
    raise SpirvError(f"malformed SPIR-V: {type(e).__name__}: {e}") from None


def _find_races(binary: bytes) -> list[Race]:
  module = read(binary)
  canonical = _Canonical(module)
  races: dict[tuple[str, int], Race] = {}
  limit = sys.getrecursionlimit()
  sys.setrecursionlimit(max(limit, 20_000))  # index expressions of unrolled kernels nest deeply
  try:
    for function in module.functions:
      entry = module.entry_points.get(function.id, module.name(function.id))
      flow = _Dataflow(module, function, canonical)
      incoming = flow.solve()
      local_size = module.local_sizes.get(function.id)

      def on_load(load: _Access, pending: set, entry=entry, local_size=local_size) -> None:
        memory = StorageClass(canonical.storage_class(load.variable))
        for store in pending:
          if load.may_read_another_invocations(store, local_size) and (entry, load.variable) not in races:
            races[entry, load.variable] = Race(
              entry, memory.name, module.name(load.variable), _describe_path(store.path), _describe_path(load.path)
            )

      for block in function.blocks:
        flow.transfer(block, incoming[block.label], on_load)
  finally:
    sys.setrecursionlimit(limit)
  return list(races.values())
