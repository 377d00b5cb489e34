"""Bad input gets a clear error naming the argument or state path, before anything reaches IREE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from iree import runtime as iree_runtime

import compile as nnxc
from nnx_models import MLP, Linear


@pytest.fixture(scope="module")
def mlp_executable():
  model = MLP(2, 16, 5, rngs=nnx.Rngs(0))
  return nnxc.load(nnxc.build(nnxc.lower(model, jnp.ones((3, 2))), "cpu")), model


def test_wrong_input_shape_names_the_argument(mlp_executable):
  executable, model = mlp_executable
  with pytest.raises(nnxc.SignatureError, match=r"Input args\[0\]: expected float32\[3, 2\], got float32\[4, 2\]"):
    executable(nnx.state(model), jnp.ones((4, 2)))


def test_wrong_input_dtype_names_the_argument(mlp_executable):
  executable, model = mlp_executable
  with pytest.raises(nnxc.SignatureError, match=r"args\[0\].*got float64\[3, 2\]"):
    executable(nnx.state(model), np.ones((3, 2)))  # numpy's default float64


def test_wrong_number_of_inputs(mlp_executable):
  executable, model = mlp_executable
  with pytest.raises(nnxc.SignatureError, match="Got 2 input arrays, expected 1"):
    executable(nnx.state(model), jnp.ones((3, 2)), jnp.ones((3, 2)))


def test_state_of_another_graph_names_the_path(mlp_executable):
  executable, _ = mlp_executable
  other = MLP(2, 8, 5, rngs=nnx.Rngs(0))
  with pytest.raises(nnxc.StateMismatchError, match=r"bn\.bias.*expected float32\[16\], got float32\[8\]"):
    executable(nnx.state(other), jnp.ones((3, 2)))


def test_partial_state_names_the_missing_leaf(mlp_executable):
  executable, model = mlp_executable
  params = nnx.state(model, nnx.Param)
  with pytest.raises(nnxc.StateMismatchError, match=r"missing bn\.mean \(BatchStat\)"):
    executable(params, jnp.ones((3, 2)))


def test_state_leaf_with_wrong_dtype_names_the_path(mlp_executable):
  executable, model = mlp_executable
  state = nnx.state(model)
  state["linear1"]["w"] = nnx.Param(state["linear1"]["w"][...].astype(jnp.bfloat16))
  with pytest.raises(nnxc.StateMismatchError, match=r"linear1\.w.*expected float32\[2, 16\], got bfloat16"):
    executable(state, jnp.ones((3, 2)))


def test_unknown_target_lists_the_valid_ones():
  with pytest.raises(nnxc.UnknownTargetError, match="expected one of metal, cpu, vulkan, cuda"):
    nnxc.get_target("opengl")
  with pytest.raises(nnxc.UnknownTargetError, match="Metal platform"):
    nnxc.get_target("metal", metal_platform="watchos")


def test_module_on_the_wrong_driver(mlp_executable):
  executable, _ = mlp_executable
  with pytest.raises(nnxc.UnknownTargetError, match="runs on the IREE driver"):
    nnxc.load(executable.compiled, device="vulkan")


def test_missing_device_is_a_clear_error():
  compiled = nnxc.build(nnxc.lower(Linear(2, 3, rngs=nnx.Rngs(0)), jnp.ones((1, 2))), "metal")
  if "metal" in iree_runtime.query_available_drivers():
    pytest.skip("this machine has a Metal driver; the error is for machines without one")
  with pytest.raises(nnxc.DeviceUnavailableError, match="'metal' is not available here"):
    nnxc.load(compiled)


class _CustomKernel(nnx.Module):
  def __init__(self, rngs):
    self.linear = Linear(2, 3, rngs=rngs)

  def __call__(self, x):
    y = self.linear(x)
    return jax.ffi.ffi_call("my_fused_kernel", jax.ShapeDtypeStruct(y.shape, y.dtype))(y)


def test_unknown_custom_call_names_op_source_line_and_target():
  lowered = nnxc.lower(_CustomKernel(nnx.Rngs(0)), jnp.ones((1, 2)))
  with pytest.raises(nnxc.UnsupportedOpError, match=r"custom_call @my_fused_kernel` at .*test_errors\.py:\d+.*'metal'"):
    nnxc.build(lowered, "metal")


def test_unsupported_element_type_names_op_and_target():
  class Fp4(nnx.Module):
    def __call__(self, x):
      return (x.astype(jnp.float4_e2m1fn).astype(jnp.float32)) * 2

  lowered = nnxc.lower(Fp4(), jnp.ones((4,)))
  with pytest.raises(nnxc.UnsupportedOpError, match=r"element type f4E2M1FN.*'vulkan'"):
    nnxc.build(lowered, "vulkan")


def test_compiler_failure_carries_target_flags_and_diagnostics():
  lowered = nnxc.lower(Linear(2, 3, rngs=nnx.Rngs(0)), jnp.ones((1, 2)))
  with pytest.raises(nnxc.CompileError) as info:
    nnxc.build(lowered, "cpu", extra_flags=("--iree-llvmcpu-target-triple=not-a-triple",))
  error = info.value
  assert error.target == "cpu" and "--iree-llvmcpu-target-triple=not-a-triple" in error.flags
  assert "not-a-triple" in str(error) and error.diagnostics
