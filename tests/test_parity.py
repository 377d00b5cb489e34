"""Compiled modules behave exactly like eager NNX: outputs and the full state, call after call."""

import functools

import pytest
from flax import nnx

import compile as nnxc
from nnx_models import ZOO
from tests.conftest import TOLERANCES, assert_trees_allclose, require_device

CALLS = 3
BATCH = 4


@functools.cache
def _compiled(name: str, mode: str, target: str) -> nnxc.Compiled:
  model = ZOO[name].make(0)
  getattr(model, mode)()
  return nnxc.build(nnxc.lower(model, *ZOO[name].example_args(BATCH, 0)), target)


def _models(name: str, mode: str) -> tuple[nnx.Module, nnx.Module]:
  """Two identical models: one eager reference, one whose state goes through the compiled module."""
  pair = ZOO[name].make(0), ZOO[name].make(0)
  for model in pair:
    getattr(model, mode)()
  return pair


@pytest.mark.parametrize("target", ["cpu", "vulkan"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(ZOO))
def test_functional_calls_match_eager(name, mode, target):
  require_device(target)
  executable = nnxc.load(_compiled(name, mode, target))
  eager, compiled_model = _models(name, mode)
  state = nnx.state(compiled_model)
  for call in range(CALLS):
    args = ZOO[name].example_args(BATCH, call)
    outputs, state = executable(state, *args)
    assert_trees_allclose(outputs, eager(*args), **TOLERANCES[target])
    assert_trees_allclose(state, nnx.state(eager), **TOLERANCES[target])
  nnx.update(compiled_model, state)
  assert_trees_allclose(nnx.state(compiled_model), nnx.state(eager), **TOLERANCES[target])


@pytest.mark.parametrize("target", ["cpu", "vulkan"])
@pytest.mark.parametrize("name", ["stateful_linear", "mlp", "stacked_mlp"])
def test_resident_session_matches_eager(name, target):
  """State kept on the device across calls, merged back at the end, equals eager."""
  require_device(target)
  eager, compiled_model = _models(name, "train")
  session = nnxc.load(_compiled(name, "train", target)).bind(nnx.state(compiled_model))
  for call in range(CALLS):
    args = ZOO[name].example_args(BATCH, call)
    assert_trees_allclose(session(*args), eager(*args), **TOLERANCES[target])
  session.update(compiled_model)
  assert_trees_allclose(nnx.state(compiled_model), nnx.state(eager), **TOLERANCES[target])


def test_merge_back_advances_every_kind_of_state():
  """After compiled calls and nnx.update, Count, BatchNorm stats and the Dropout RNG count moved."""
  _, model = _models("mlp", "train")
  count_before, key_dtype = int(model.dropout.rngs.count[...]), model.dropout.rngs.key[...].dtype
  executable = nnxc.load(_compiled("mlp", "train", "cpu"))
  _, state = executable(nnx.state(model), *ZOO["mlp"].example_args(BATCH, 0))
  nnx.update(model, state)
  assert int(model.dropout.rngs.count[...]) == count_before + 1
  assert float(abs(model.bn.mean[...]).sum()) > 0.0  # running mean moved off its zero init
  assert model.dropout.rngs.key[...].dtype == key_dtype  # re-wrapped as a typed key
