"""Lowering produces StableHLO iree-compile accepts, with a faithful flat signature."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import compile as nnxc
from nnx_models import MLP, Linear, StatefulLinear
from tests.conftest import RUNNABLE, TOLERANCES, assert_trees_allclose, require_device


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
  model = MLP(2, 16, 5, rngs=nnx.Rngs(0))
  jax.config.update("jax_use_shardy_partitioner", False)
  try:
    nnxc.export(model, {"f": nnxc.method("__call__", _x(3, 2))}, cache=False)  # iree-compile accepts it
  finally:
    jax.config.update("jax_use_shardy_partitioner", True)


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
  model = TwoMethods(nnx.Rngs(0))
  args = (jax.ShapeDtypeStruct((2, 4), jnp.float32), jnp.float32(2.0))
  program = nnxc.export(model, {"features": nnxc.method("features", *args)}).load()
  out = program.features(np.asarray(_x(2, 4)), np.float32(2.0))
  assert_trees_allclose(out, jax.tree.map(np.asarray, model.features(_x(2, 4), 2.0)), **TOLERANCES["cpu"])


def test_lowering_for_a_spirv_target_shows_its_rewrites():
  model = MLP(2, 16, 5, rngs=nnx.Rngs(0))
  plain, metal = nnxc.lower(model, _x(3, 2)), nnxc.lower(model, _x(3, 2), target="metal")
  assert plain.target is None and plain.rewrites == {} and "optimization_barrier" not in plain.mlir
  assert metal.target == "metal" and metal.rewrites["isolate_reductions"] >= 2  # BatchNorm's mean and variance
  assert "stablehlo.optimization_barrier" in metal.mlir
  assert "_mlp.py" in plain.mlir  # ops carry their Python source lines


@pytest.mark.parametrize("target", RUNNABLE)
def test_unsigned_counter_round_trips(target):
  require_device(target)
  model = StatefulLinear(3, 5, rngs=nnx.Rngs(0))
  model.count[...] = jnp.uint32(2**32 - 2)  # wraps around like eager uint32
  program = nnxc.export(model, {"f": nnxc.method("__call__", _x(1, 3))}, target=target).load()
  for _ in range(3):
    program.f(np.asarray(_x(1, 3)))
  count = program.state()["count"][...]
  assert count.dtype == jnp.uint32 and int(count) == 1


@pytest.mark.parametrize("target", RUNNABLE)
def test_float64_models_compile_with_documented_demotion(target):
  """With jax_enable_x64, f64 state runs as f32 on SPIR-V targets (Metal has no f64) and comes back f64."""
  require_device(target)
  with jax.enable_x64(True):
    model = Linear(3, 4, rngs=nnx.Rngs(0))
    x = np.linspace(0, 1, 6).reshape(2, 3)
    assert model.w[...].dtype == jnp.float64
    artifact = nnxc.export(model, {"f": nnxc.method("__call__", x)}, target=target)
    demoted = artifact.manifest.target.demote_f64
    assert demoted == (target != "cpu")
    assert artifact.state[0].device_dtype == ("float32" if demoted else "float64")
    y, state = artifact.load().functional("f")(nnx.state(model), x)
    assert y.dtype == np.float64 and state["w"][...].dtype == jnp.float64
    tolerance = dict(rtol=1e-6, atol=1e-6) if demoted else dict(rtol=1e-12, atol=1e-12)
    assert_trees_allclose(y, np.asarray(model(x)), **tolerance)
