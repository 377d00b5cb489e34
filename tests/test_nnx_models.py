"""The zoo runs eagerly, and LoRA surgery keeps structure, sharing and outputs right."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nnx_models import MLP, ZOO, Count, Counter, Linear, LoraLinear, LoraParam, StatefulLinear, lora, merge_lora


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_runs_eagerly(name):
  entry = ZOO[name]
  out = entry.make(0)(*entry.example_args(3, 0))
  assert out is None or out.shape[0] == 3


def test_counters_count():
  counter, stateful = Counter(), StatefulLinear(3, 5, rngs=nnx.Rngs(0))
  counter(), counter()
  stateful(jnp.ones((1, 3)))
  assert int(counter.count[...]) == 2
  assert stateful.count[...].dtype == jnp.uint32 and int(stateful.count[...]) == 1
  _, counts, _ = nnx.split(stateful, Count, ...)
  assert [p for p, _ in nnx.to_flat_state(counts)] == [("count",)]


def test_stacked_mlp_has_a_layer_axis():
  model = ZOO["stacked_mlp"].make(0)
  assert model.layers.linear1.w.shape == (5, 10, 32)
  assert model.layers.dropout.rngs.key.shape == (5,)


def test_lora_wraps_every_linear_and_separates_lora_state():
  model = lora(MLP(2, 32, 5, rngs=nnx.Rngs(0)), 4, rngs=nnx.Rngs(1))
  assert isinstance(model.linear1, LoraLinear) and isinstance(model.linear2, LoraLinear)
  assert model.linear1.A.shape == (2, 4) and model.linear2.B.shape == (4, 5)
  _, lora_state, rest = nnx.split(model, LoraParam, ...)
  assert sorted(p for p, _ in nnx.to_flat_state(lora_state)) == [
    ("linear1", "A"),
    ("linear1", "B"),
    ("linear2", "A"),
    ("linear2", "B"),
  ]
  assert all(not isinstance(v, LoraParam) for _, v in nnx.to_flat_state(rest))


def test_lora_filter_selects_by_path():
  model = lora(MLP(2, 32, 5, rngs=nnx.Rngs(0)), 4, rngs=nnx.Rngs(1), where=nnx.PathContains("linear2"))
  assert isinstance(model.linear1, Linear) and isinstance(model.linear2, LoraLinear)


class _Shared(nnx.Module):
  """One Linear reachable from an attribute, an nnx.List, an nnx.Dict and a nested module."""

  def __init__(self, rngs):
    shared = Linear(4, 4, rngs=rngs)
    self.direct = shared
    self.layers = nnx.List([shared, nnx.Linear(4, 4, rngs=rngs)])
    self.named = nnx.Dict({"s": shared})
    self.inner = nnx.Sequential(shared)

  def __call__(self, x):
    return self.direct(x) + self.layers[1](x) + self.named["s"](x) + self.inner(x)


def test_lora_reaches_containers_and_keeps_sharing():
  original = _Shared(nnx.Rngs(0))
  model = lora(original, 2, rngs=nnx.Rngs(1))
  assert isinstance(model.direct, LoraLinear)
  assert model.direct is model.layers[0] is model.named["s"] is model.inner.layers[0]
  assert isinstance(model.layers[1], LoraLinear)  # flax's nnx.Linear too
  assert model.direct.linear.w is original.direct.w  # base Variables are shared, not copied
  assert isinstance(original.direct, Linear)  # the input model is untouched


def test_merge_lora_restores_linears_with_the_same_outputs():
  model = lora(_Shared(nnx.Rngs(0)), 2, rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(2), (3, 4))
  merged = merge_lora(model)
  assert type(merged.direct) is Linear and type(merged.layers[1]) is nnx.Linear
  assert merged.direct is merged.layers[0] is merged.named["s"]
  np.testing.assert_allclose(merged(x), model(x), rtol=1e-5, atol=1e-5)
  assert not any(isinstance(v, LoraParam) for _, v in nnx.to_flat_state(nnx.state(merged)))
