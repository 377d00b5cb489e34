"""Lowering produces StableHLO iree-compile accepts, with a faithful flat signature."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import compile as nnxc
from nnx_models import MLP, Linear, StatefulLinear
from tests.conftest import TOLERANCES, assert_trees_allclose, require_device


def _x(*shape):
  return jax.random.normal(jax.random.key(0), shape)


def test_lowered_mlir_has_no_sharding_annotations():
  lowered = nnxc.lower(MLP(2, 16, 5, rngs=nnx.Rngs(0)), _x(3, 2))
  assert "sdy." not in lowered.mlir
  assert "@Sharding" not in lowered.mlir
  assert "func.func public @main" in lowered.mlir


def test_sharding_noops_are_removed_with_shardy_off_too():
  jax.config.update("jax_use_shardy_partitioner", False)
  try:
    lowered = nnxc.lower(MLP(2, 16, 5, rngs=nnx.Rngs(0)), _x(3, 2))
  finally:
    jax.config.update("jax_use_shardy_partitioner", True)
  assert "@Sharding" not in lowered.mlir
  nnxc.build(lowered, "cpu")  # iree-compile accepts it


def test_signature_names_every_state_leaf_with_its_variable_type():
  lowered = nnxc.lower(MLP(2, 16, 5, rngs=nnx.Rngs(0)), _x(3, 2))
  leaves = {leaf.name: leaf for leaf in lowered.state.leaves}
  assert leaves["linear1.w"].variable_type == "Param" and leaves["linear1.w"].shape == (2, 16)
  assert leaves["bn.mean"].variable_type == "BatchStat"
  assert leaves["dropout.rngs.count"].dtype == "uint32"
  # The typed key crosses as its key_data and remembers how to re-wrap.
  key = leaves["dropout.rngs.key"]
  assert (key.dtype, key.shape, key.key_impl) == ("uint32", (2,), "threefry2x32")
  assert [a.describe() for a in lowered.args] == ["args[0]: float32[3, 2]"]
  assert "MLP.__call__" in lowered.signature()


def test_train_and_eval_lower_to_different_programs():
  model = MLP(2, 16, 5, rngs=nnx.Rngs(0))
  train = nnxc.lower(model, _x(3, 2))
  model.eval()
  evaluation = nnxc.lower(model, _x(3, 2))
  assert train.mlir != evaluation.mlir
  assert "shift_right_logical" in train.mlir and "shift_right_logical" not in evaluation.mlir  # no RNG in eval


def test_lowering_accepts_shape_specs_and_other_methods():
  class TwoMethods(nnx.Module):
    def __init__(self, rngs):
      self.linear = Linear(4, 3, rngs=rngs)

    def __call__(self, x):
      return self.linear(x)

    def features(self, x, scale):
      return {"y": self.linear(x) * scale, "norm": jnp.sum(x * x)}

  lowered = nnxc.lower(
    TwoMethods(nnx.Rngs(0)), jax.ShapeDtypeStruct((2, 4), jnp.float32), jnp.float32(2.0), method="features"
  )
  assert [leaf.name for leaf in lowered.outputs] == ["outputs['norm']", "outputs['y']"]
  executable = nnxc.load(nnxc.build(lowered, "cpu"))
  model = TwoMethods(nnx.Rngs(0))
  out, _ = executable(nnx.state(model), _x(2, 4), jnp.float32(2.0))
  assert_trees_allclose(out, model.features(_x(2, 4), 2.0), **TOLERANCES["cpu"])


@pytest.mark.parametrize("target", ["cpu", "vulkan"])
def test_unsigned_counter_round_trips(target):
  require_device(target)
  model = StatefulLinear(3, 5, rngs=nnx.Rngs(0))
  model.count[...] = jnp.uint32(2**32 - 2)  # wraps around like eager uint32
  executable = nnxc.load(nnxc.build(nnxc.lower(model, _x(1, 3)), target))
  state = nnx.state(model)
  for _ in range(3):
    _, state = executable(state, _x(1, 3))
  assert state["count"][...].dtype == jnp.uint32 and int(state["count"][...]) == 1


@pytest.mark.parametrize("target", ["cpu", "vulkan"])
def test_float64_models_compile_with_documented_demotion(target):
  """With jax_enable_x64, f64 state runs as f32 on SPIR-V targets (Metal has no f64) and comes back f64."""
  require_device(target)
  with jax.enable_x64(True):
    model = Linear(3, 4, rngs=nnx.Rngs(0))
    x = np.linspace(0, 1, 6).reshape(2, 3)
    assert model.w[...].dtype == jnp.float64
    compiled = nnxc.build(nnxc.lower(model, x), target)
    assert compiled.target.demote_f64 == (target != "cpu")
    y, state = nnxc.load(compiled)(nnx.state(model), x)
    assert y.dtype == jnp.float64 and state["w"][...].dtype == jnp.float64
    tolerance = dict(rtol=1e-6, atol=1e-6) if compiled.target.demote_f64 else dict(rtol=1e-12, atol=1e-12)
    assert_trees_allclose(y, model(x), **tolerance)
