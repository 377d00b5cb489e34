"""Reads SPIR-V binaries: the instructions, names, decorations and entry points a memory analysis needs.

A SPIR-V module is five header words, then instructions. The first word of an
instruction holds its word count (high 16 bits) and opcode (low 16 bits); which of
the following words are a result type and a result id depends on the opcode, and
is given by the SPIR-V grammar. Only the two tables below are needed from it.

Imports only the standard library: shipped artifacts are re-checked without JAX.
"""

import dataclasses
import enum
import struct

from ..runtime import NnxMetalError

MAGIC = 0x07230203

# From the SPIR-V 1.6 unified grammar (spirv.core.grammar.json), core opcodes only:
# instructions that define no result id, and those that define one without a type.
# Every other instruction is `<result type> <result id> <operands...>`.
_NO_RESULT = frozenset(
  {0, 2, 3, 4, 5, 6, 8, 10, 14, 15, 16, 17, 39, 56, 62, 63, 64, 71, 72, 74, 75, 99, 218, 219, 220, 221, 224, 225}
  | {228, 246, 247, 249, 250, 251, 252, 253, 254, 255, 256, 257, 260, 280, 281, 287, 288, 297, 298, 301, 302}
  | {317, 319, 329, 330, 331, 332, 4416}
)
_RESULT_WITHOUT_TYPE = frozenset(
  {7, 11, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 73, 248, 322, 327}
)


class Op(enum.IntEnum):
  """The opcodes the analyses look at."""

  Name = 5
  EntryPoint = 15
  ExecutionMode = 16
  TypePointer = 32
  ConstantTrue = 41
  ConstantFalse = 42
  Constant = 43
  ConstantComposite = 44
  ConstantNull = 46
  Function = 54
  FunctionParameter = 55
  FunctionEnd = 56
  FunctionCall = 57
  Variable = 59
  Load = 61
  Store = 62
  CopyMemory = 63
  AccessChain = 65
  InBoundsAccessChain = 66
  PtrAccessChain = 67
  Decorate = 71
  InBoundsPtrAccessChain = 70
  CopyObject = 83
  IAdd = 128
  IMul = 132
  ControlBarrier = 224
  Phi = 245
  LoopMerge = 246
  SelectionMerge = 247
  Label = 248
  Branch = 249
  BranchConditional = 250
  Switch = 251
  Kill = 252
  Return = 253
  ReturnValue = 254
  Unreachable = 255
  TerminateInvocation = 4416


class StorageClass(enum.IntEnum):
  Input = 1
  Uniform = 2
  Workgroup = 4
  CrossWorkgroup = 5
  Private = 6
  Function = 7
  PushConstant = 9
  StorageBuffer = 12
  PhysicalStorageBuffer = 5349


class Scope(enum.IntEnum):
  CrossDevice = 0
  Device = 1
  Workgroup = 2
  Subgroup = 3
  Invocation = 4


DECORATION_BUILTIN = 11
EXECUTION_MODE_LOCAL_SIZE = 17
TERMINATORS = frozenset(
  {Op.Branch, Op.BranchConditional, Op.Switch, Op.Kill, Op.Return, Op.ReturnValue, Op.Unreachable}
  | {Op.TerminateInvocation}
)


class SpirvError(NnxMetalError, ValueError):
  """Bytes that are not a well-formed SPIR-V module."""


@dataclasses.dataclass(frozen=True)
class Instruction:
  """One instruction: its opcode, result type and result ids (None where it has none), other words."""

  opcode: int
  type_id: int | None
  result_id: int | None
  operands: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Block:
  """A basic block: its label, its instructions (the terminator last) and its successor labels."""

  label: int
  instructions: tuple[Instruction, ...]
  successors: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Function:
  id: int
  blocks: tuple[Block, ...]


@dataclasses.dataclass(frozen=True)
class Module:
  """A parsed SPIR-V module.

  Attributes:
    definitions: every instruction that defines a result id, by that id.
    names: debug names (``OpName``), by id.
    builtins: the BuiltIn decoration of decorated ids (e.g. 27 for LocalInvocationId).
    entry_points: ``{function id: entry point name}``.
    local_sizes: ``{function id: (x, y, z)}`` workgroup sizes of the entry points.
    functions: every function with its blocks.
  """

  definitions: dict[int, Instruction]
  names: dict[int, str]
  builtins: dict[int, int]
  entry_points: dict[int, str]
  local_sizes: dict[int, tuple[int, ...]]
  functions: tuple[Function, ...]

  def name(self, id_: int) -> str:
    return self.names.get(id_, f"%{id_}")


def decode_string(words: tuple[int, ...]) -> tuple[str, int]:
  """A nul-terminated UTF-8 literal packed into words; returns it and the number of words it took."""
  data = struct.pack(f"<{len(words)}I", *words)
  end = data.find(b"\0")
  if end < 0:
    raise SpirvError("unterminated string literal")
  return data[:end].decode("utf-8", errors="replace"), end // 4 + 1


def instructions(binary: bytes) -> list[Instruction]:
  """The instructions of a SPIR-V binary (little- or big-endian)."""
  if len(binary) < 20 or len(binary) % 4:
    raise SpirvError(f"{len(binary)} bytes is not a SPIR-V module (a header of 5 words, then whole words)")
  order = "<" if struct.unpack_from("<I", binary)[0] == MAGIC else ">"
  words = struct.unpack(f"{order}{len(binary) // 4}I", binary)
  if words[0] != MAGIC:
    raise SpirvError("missing the SPIR-V magic number")
  result, position = [], 5
  while position < len(words):
    count, opcode = words[position] >> 16, words[position] & 0xFFFF
    if count == 0 or position + count > len(words):
      raise SpirvError(f"instruction at word {position} has a bad word count {count}")
    body = words[position + 1 : position + count]
    if opcode in _NO_RESULT:
      result.append(Instruction(opcode, None, None, body))
    elif opcode in _RESULT_WITHOUT_TYPE:
      result.append(Instruction(opcode, None, body[0], body[1:]))
    else:
      result.append(Instruction(opcode, body[0], body[1], body[2:]))
    position += count
  return result


def _blocks(body: list[Instruction]) -> tuple[Block, ...]:
  blocks, label, current = [], None, []
  for instruction in body:
    if instruction.opcode == Op.Label:
      label, current = instruction.result_id, []
      continue
    current.append(instruction)
    if instruction.opcode in TERMINATORS:
      blocks.append(Block(label, tuple(current), _successors(instruction)))
  return tuple(blocks)


def _successors(terminator: Instruction) -> tuple[int, ...]:
  if terminator.opcode == Op.Branch:
    return (terminator.operands[0],)
  if terminator.opcode == Op.BranchConditional:
    return tuple(terminator.operands[1:3])
  if terminator.opcode == Op.Switch:  # selector, default, then (literal, label) pairs
    return (terminator.operands[1], *terminator.operands[3::2])
  return ()


def read(binary: bytes) -> Module:
  """Parses ``binary`` into a :class:`Module`.

  Raises:
    SpirvError: the bytes are not a well-formed SPIR-V module.
  """
  definitions, names, builtins, entry_points, local_sizes = {}, {}, {}, {}, {}
  functions, body, function_id = [], None, None
  for instruction in instructions(binary):
    op, operands = instruction.opcode, instruction.operands
    if instruction.result_id is not None:
      definitions[instruction.result_id] = instruction
    if op == Op.Name:
      names[operands[0]] = decode_string(operands[1:])[0]
    elif op == Op.Decorate and len(operands) >= 3 and operands[1] == DECORATION_BUILTIN:
      builtins[operands[0]] = operands[2]
    elif op == Op.EntryPoint:
      entry_points[operands[1]] = decode_string(operands[2:])[0]
    elif op == Op.ExecutionMode and operands[1:2] == (EXECUTION_MODE_LOCAL_SIZE,):
      local_sizes[operands[0]] = tuple(operands[2:5])
    elif op == Op.Function:
      function_id, body = instruction.result_id, []
    elif op == Op.FunctionEnd:
      functions.append(Function(function_id, _blocks(body)))
      body = None
    elif body is not None and op != Op.FunctionParameter:
      body.append(instruction)
  return Module(definitions, names, builtins, entry_points, local_sizes, tuple(functions))
