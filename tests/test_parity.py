"""Programs behave exactly like eager NNX used functionally: state in, outputs and new state out, call after call."""

import functools

import numpy as np
import pytest
from flax import nnx

import compile as nnxc
from nnx_models import ZOO
from tests.conftest import RUNNABLE, TOLERANCES, assert_trees_allclose, require_device

CALLS = 3
BATCH = 4


@functools.cache
def _program(name: str, target: str) -> nnxc.Program:
  args = ZOO[name].example_args(BATCH, 0)
  functions = {mode: nnxc.method("__call__", *args, mode=mode) for mode in ("train", "eval")}
  return nnxc.export(ZOO[name].make(0), functions, target=target).load()


@pytest.mark.parametrize("target", RUNNABLE)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(ZOO))
def test_functional_calls_match_eager(name, mode, target):
  require_device(target)
  step = _program(name, target).functional(mode)
  eager = ZOO[name].make(0)
  getattr(eager, mode)()
  state = nnx.state(ZOO[name].make(0))
  for call in range(CALLS):
    args = ZOO[name].example_args(BATCH, call)
    outputs, state = step(state, *[np.asarray(a) for a in args])
    assert_trees_allclose(outputs, eager(*args), **TOLERANCES[target])
    assert_trees_allclose(state, nnx.state(eager), **TOLERANCES[target])


def test_merge_back_advances_every_kind_of_state():
  """After compiled calls and nnx.update, Count, BatchNorm stats and the Dropout RNG count moved."""
  model = ZOO["mlp"].make(0)
  count_before, key_dtype = int(model.dropout.rngs.count[...]), model.dropout.rngs.key[...].dtype
  _, state = _program("mlp", "cpu").functional("train")(nnx.state(model), *ZOO["mlp"].example_args(BATCH, 0))
  nnx.update(model, state)
  assert int(model.dropout.rngs.count[...]) == count_before + 1
  assert float(abs(model.bn.mean[...]).sum()) > 0.0  # running mean moved off its zero init
  assert model.dropout.rngs.key[...].dtype == key_dtype  # re-wrapped as a typed key


def test_functional_use_needs_the_whole_state():
  model = ZOO["mlp"].make(0)
  step = _program("mlp", "cpu").functional("eval")
  with pytest.raises(nnxc.StateMismatchError, match=r"lacks bn\.mean \(BatchStat\)"):
    step(nnx.state(model, nnx.Param), *ZOO["mlp"].example_args(BATCH, 0))
