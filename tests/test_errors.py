"""Bad input gets a clear error naming the argument, state path, op or source line, before anything reaches IREE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from iree import runtime as iree_runtime

import compile as nnxc
from nnx_models import MLP, Linear


@pytest.fixture(scope="module")
def mlp_program():
  model = MLP(2, 16, 5, rngs=nnx.Rngs(0))
  return nnxc.export(model, {"eval": nnxc.method("__call__", jnp.ones((3, 2)), mode="eval")}).load(), model


def test_wrong_input_shape_names_the_argument(mlp_program):
  program, _ = mlp_program
  with pytest.raises(nnxc.SignatureError, match=r"input args\[0\]: expected float32\[3, 2\], got float32\[4, 2\]"):
    program.eval(np.ones((4, 2), np.float32))


def test_wrong_input_dtype_names_the_argument(mlp_program):
  program, _ = mlp_program
  with pytest.raises(nnxc.SignatureError, match=r"args\[0\].*expected float32\[3, 2\], got int32\[3, 2\]"):
    program.eval(np.ones((3, 2), np.int32))  # float64 is taken as float32, as jax.jit does; integers are not


def test_big_endian_input_of_the_right_type_is_accepted(mlp_program):
  program, _ = mlp_program
  x = np.linspace(0, 1, 6, dtype=np.float32).reshape(3, 2)
  np.testing.assert_array_equal(program.eval(x.astype(">f4")), program.eval(x))


def test_wrong_number_of_inputs(mlp_program):
  program, _ = mlp_program
  with pytest.raises(nnxc.SignatureError, match="takes 1 input arrays, got 2"):
    program.eval(np.ones((3, 2), np.float32), np.ones((3, 2), np.float32))


def test_state_of_another_graph_names_the_path(mlp_program):
  program, _ = mlp_program
  other = MLP(2, 8, 5, rngs=nnx.Rngs(0))
  with pytest.raises(nnxc.StateMismatchError, match=r"bn\.bias: expected float32\[16\], got float32\[8\]"):
    program.functional("eval")(nnx.state(other), np.ones((3, 2), np.float32))


def test_state_leaf_with_wrong_dtype_names_the_path(mlp_program):
  program, model = mlp_program
  state = nnx.state(model)
  state["linear1"]["w"] = nnx.Param(state["linear1"]["w"][...].astype(jnp.bfloat16))
  with pytest.raises(nnxc.StateMismatchError, match=r"linear1\.w: expected float32\[2, 16\], got bfloat16"):
    program.functional("eval")(state, np.ones((3, 2), np.float32))


def test_unknown_target_lists_the_valid_ones():
  with pytest.raises(nnxc.UnknownTargetError, match="expected one of metal, metal-vulkan, vulkan, cpu, cuda"):
    nnxc.get_target("opengl")
  with pytest.raises(nnxc.UnknownTargetError, match="Metal platform"):
    nnxc.get_target("metal", metal_platform="watchos")


def test_program_on_the_wrong_driver(mlp_program):
  program, _ = mlp_program
  with pytest.raises(nnxc.UnknownTargetError, match="runs on the IREE driver"):
    program.artifact.load(device="vulkan")


def test_missing_device_is_a_clear_error():
  artifact = nnxc.export(
    Linear(2, 3, rngs=nnx.Rngs(0)), {"f": nnxc.method("__call__", jnp.ones((1, 2)))}, target="metal"
  )
  if "metal" in iree_runtime.query_available_drivers():
    pytest.skip("this machine has a Metal driver; the error is for machines without one")
  with pytest.raises(nnxc.DeviceUnavailableError, match="'metal' is not available here"):
    artifact.load()


class _CustomKernel(nnx.Module):
  def __init__(self, rngs):
    self.linear = Linear(2, 3, rngs=rngs)

  def __call__(self, x):
    y = self.linear(x)
    return jax.ffi.ffi_call("my_fused_kernel", jax.ShapeDtypeStruct(y.shape, y.dtype))(y)


def test_unknown_custom_call_names_op_source_line_and_target():
  model = _CustomKernel(nnx.Rngs(0))
  pattern = r"custom_call @my_fused_kernel at .*test_errors\.py:\d+:\d+.*'metal'"
  with pytest.raises(nnxc.UnsupportedOpError, match=pattern):
    nnxc.export(model, {"f": nnxc.method("__call__", jnp.ones((1, 2)))}, target="metal")


def test_unsupported_element_type_names_op_and_target():
  class Fp4(nnx.Module):
    def __call__(self, x):
      return (x.astype(jnp.float4_e2m1fn).astype(jnp.float32)) * 2

  with pytest.raises(nnxc.UnsupportedOpError, match=r"element type f4E2M1FN.*'vulkan'"):
    nnxc.export(Fp4(), {"f": nnxc.method("__call__", jnp.ones((4,)))}, target="vulkan")


def test_compiler_failure_carries_target_flags_and_diagnostics():
  model = Linear(2, 3, rngs=nnx.Rngs(0))
  with pytest.raises(nnxc.CompileError) as info:
    nnxc.export(
      model,
      {"f": nnxc.method("__call__", jnp.ones((1, 2)))},
      extra_flags=("--iree-llvmcpu-target-triple=not-a-triple",),
    )
  error = info.value
  assert error.target == "cpu" and "--iree-llvmcpu-target-triple=not-a-triple" in error.flags
  assert "not-a-triple" in str(error) and error.diagnostics


def test_float16_on_a_vulkan_target_without_16_bit_floats_is_refused_before_compiling():
  model = nnx.Linear(4, 3, dtype=jnp.float16, param_dtype=jnp.float16, rngs=nnx.Rngs(0))
  functions = {"f": nnxc.method("__call__", jnp.ones((2, 4), jnp.float16))}
  pattern = r"stablehlo\.\w+ at .*uses element type f16.*'vp_android_baseline_2022' Vulkan target has no 16-bit"
  with pytest.raises(nnxc.UnsupportedOpError, match=pattern):
    nnxc.export(model, functions, target="vulkan", vulkan_target="vp_android_baseline_2022")
  assert nnxc.export(model, functions, target="vulkan").manifest.state[0].dtype == "float16"  # the default profile


def test_an_unknown_vulkan_target_is_a_clear_error():
  with pytest.raises(nnxc.NnxMetalError, match="no-such-gpu"):
    nnxc.get_target("vulkan", vulkan_target="no-such-gpu")
