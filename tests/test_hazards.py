"""The SPIR-V race check on small hand-written kernels: what it must find, and what it must let pass."""

import subprocess

import pytest

import compile as nnxc
from compile.spirv import SpirvError
from tests.conftest import spirv_tool

# A compute kernel of 16 invocations with a workgroup array and a storage buffer of floats;
# {body} runs in the entry block after %tid (this invocation's index) and %next (tid + 1).
KERNEL = """
OpCapability Shader
OpExtension "SPV_KHR_storage_buffer_storage_class"
OpMemoryModel Logical GLSL450
OpEntryPoint GLCompute %main "main" %lid
OpExecutionMode %main LocalSize 16 1 1
OpName %wg "wg"
OpName %buf "buf"
OpDecorate %lid BuiltIn LocalInvocationId
OpDecorate %rt ArrayStride 4
OpMemberDecorate %buf_t 0 Offset 0
OpDecorate %buf_t Block
OpDecorate %buf DescriptorSet 0
OpDecorate %buf Binding 0
%void = OpTypeVoid
%fn = OpTypeFunction %void
%uint = OpTypeInt 32 0
%bool = OpTypeBool
%float = OpTypeFloat 32
%v3uint = OpTypeVector %uint 3
%c0 = OpConstant %uint 0
%c1 = OpConstant %uint 1
%workgroup = OpConstant %uint 2
%subgroup = OpConstant %uint 3
%c16 = OpConstant %uint 16
%semantics = OpConstant %uint 264
%f1 = OpConstant %float 1
%false = OpConstantFalse %bool
%arr = OpTypeArray %float %c16
%ptr_wg_arr = OpTypePointer Workgroup %arr
%ptr_wg = OpTypePointer Workgroup %float
%ptr_in = OpTypePointer Input %v3uint
%rt = OpTypeRuntimeArray %float
%buf_t = OpTypeStruct %rt
%ptr_sb_buf = OpTypePointer StorageBuffer %buf_t
%ptr_sb = OpTypePointer StorageBuffer %float
%ptr_fn = OpTypePointer Function %float
%wg = OpVariable %ptr_wg_arr Workgroup
%lid = OpVariable %ptr_in Input
%buf = OpVariable %ptr_sb_buf StorageBuffer
%main = OpFunction %void None %fn
%entry = OpLabel
%private = OpVariable %ptr_fn Function
%l = OpLoad %v3uint %lid
%tid = OpCompositeExtract %uint %l 0
%next = OpIAdd %uint %tid %c1
{body}
OpReturn
OpFunctionEnd
"""


def _store(name: str, index: str, memory: str = "wg") -> str:
  pointer = f"%ptr_{'sb' if memory == 'buf' else 'wg'}"
  chain = f"%{memory} %c0 %{index}" if memory == "buf" else f"%{memory} %{index}"
  return f"%{name} = OpAccessChain {pointer} {chain}\nOpStore %{name} %f1"


def _load(name: str, index: str, memory: str = "wg") -> str:
  pointer = f"%ptr_{'sb' if memory == 'buf' else 'wg'}"
  chain = f"%{memory} %c0 %{index}" if memory == "buf" else f"%{memory} %{index}"
  return f"%{name}p = OpAccessChain {pointer} {chain}\n%{name} = OpLoad %float %{name}p"


BARRIER = "OpControlBarrier %workgroup %workgroup %semantics"
LOOP = """OpBranch %header
%header = OpLabel
%i = OpPhi %uint %c0 %entry %inext %continue
%more = OpULessThan %bool %i %c16
OpLoopMerge %merge %continue None
OpBranchConditional %more %body %merge
%body = OpLabel
{loop_body}
OpBranch %continue
%continue = OpLabel
%inext = OpIAdd %uint %i %c1
OpBranch %header
%merge = OpLabel"""

CASES = {
  # name: (body, races expected)
  "own slot read back": (f"{_store('s', 'tid')}\n{_load('v', 'tid')}", 0),
  "neighbour's slot": (f"{_store('s', 'tid')}\n{_load('v', 'next')}", 1),
  "neighbour's slot after a barrier": (f"{_store('s', 'tid')}\n{BARRIER}\n{_load('v', 'next')}", 0),
  "a subgroup barrier does not order the workgroup": (
    f"{_store('s', 'tid')}\nOpControlBarrier %subgroup %subgroup %semantics\n{_load('v', 'next')}",
    1,
  ),
  "every slot read in a loop": (f"{_store('s', 'tid')}\n{LOOP.format(loop_body=_load('v', 'i'))}", 1),
  "every slot read in a loop after a barrier": (
    f"{_store('s', 'tid')}\n{BARRIER}\n{LOOP.format(loop_body=_load('v', 'i'))}",
    0,
  ),
  "stored at the end of an iteration, the neighbour's read at the start of the next": (
    LOOP.format(loop_body=f"{_load('v', 'next')}\n{_store('s', 'tid')}"),
    1,
  ),
  "a barrier on one path only": (
    f"""{_store("s", "tid")}
%few = OpULessThan %bool %tid %workgroup
OpSelectionMerge %join None
OpBranchConditional %few %then %join
%then = OpLabel
{BARRIER}
OpBranch %join
%join = OpLabel
{_load("v", "next")}""",
    1,
  ),
  "storage buffer: own slot": (f"{_store('s', 'tid', 'buf')}\n{_load('v', 'tid', 'buf')}", 0),
  "storage buffer: neighbour's slot": (f"{_store('s', 'tid', 'buf')}\n{_load('v', 'next', 'buf')}", 1),
  "private memory is private": ("OpStore %private %f1\n%v = OpLoad %float %private", 0),
}

# A scan over each invocation's own row of the storage buffer, as IREE writes cumsum:
# iteration i reads what this invocation stored at i - 1 (guarded by {guard}) and stores at i.
SCAN_BODY = """%at = OpIAdd %uint %base %i
%before = OpISub %uint %at %c1
%first = OpIEqual %bool %i %c0
OpSelectionMerge %stored None
OpBranchConditional %{guard} %stored %read
%read = OpLabel
%previous = OpAccessChain %ptr_sb %buf %c0 %before
%v = OpLoad %float %previous
OpBranch %stored
%stored = OpLabel
%slot = OpAccessChain %ptr_sb %buf %c0 %at
OpStore %slot %f1"""


def _scan(stride: str, guard: str) -> str:
  return f"%base = OpIMul %uint %tid %{stride}\n" + LOOP.format(loop_body=SCAN_BODY.format(guard=guard))


# Rows of 16 slots: guarded, the read stays in this invocation's row; unguarded, i = 0
# reads the last slot of the row before; with rows 1 apart, the rows overlap.
CASES["scan: own earlier slot"] = (_scan(stride="c16", guard="first"), 0)
CASES["scan: unguarded, the row before's last slot"] = (_scan(stride="c16", guard="false"), 1)
CASES["scan: rows that overlap"] = (_scan(stride="c1", guard="first"), 1)


def _assemble(body: str, tmp_path) -> bytes:
  source = tmp_path / "kernel.spvasm"
  source.write_text(KERNEL.format(body=body))
  binary = tmp_path / "kernel.spv"
  command = [spirv_tool("spirv-as"), "--target-env", "spv1.3", str(source), "-o", str(binary)]
  result = subprocess.run(command, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  validate = subprocess.run([spirv_tool("spirv-val"), str(binary)], capture_output=True, text=True)
  assert validate.returncode == 0, validate.stderr
  return binary.read_bytes()


@pytest.mark.parametrize("case", list(CASES))
def test_race_check(case, tmp_path):
  body, expected = CASES[case]
  races = nnxc.find_races(_assemble(body, tmp_path))
  assert len(races) == expected, [race.describe() for race in races]


def test_a_race_names_kernel_memory_and_both_slots(tmp_path):
  (race,) = nnxc.find_races(_assemble(CASES["every slot read in a loop"][0], tmp_path))
  assert race.entry_point == "main" and race.memory == "Workgroup" and race.variable == "wg"
  assert race.store == "LocalInvocationId.x" and race.load == "counter(0, (1 + itself), < 16)"
  assert "loads Workgroup memory wg[counter(0, (1 + itself), < 16)] after storing wg[LocalInvocationId.x]" in (
    race.describe()
  )


@pytest.mark.parametrize(
  "damage", [b"", b"\x03\x02\x23\x07", b"not spirv at all", b"\x03\x02\x23\x07" + b"\0" * 16 + b"\xff\xff\xff\xff"]
)
def test_malformed_spirv_is_a_clear_error(damage):
  with pytest.raises(SpirvError):
    nnxc.find_races(damage)
