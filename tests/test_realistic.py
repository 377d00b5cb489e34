"""The realistic benchmark models (``nox -s bench``) at full size on the cpu target: outputs and state match eager.

These are the programs the benchmarks time, with the options only the cpu target has
(data tiling, microkernels, the stack limit they need): a benchmark never checks what
it computes, so this does, for two train steps and a forward pass.
"""

import jax
import numpy as np
import pytest
from flax import nnx

import compile as nnxc
from compile import call_with_objects
from compile.runtime import path_name
from nnx_models import REALISTIC
from tests.conftest import assert_trees_allclose

STEPS = 2
TOLERANCE = dict(rtol=2e-3, atol=2e-4)
# Adam moves a parameter by about its learning rate whatever the gradient's size, so
# a gradient within rounding of zero (summed in another order than XLA's) can move
# a weight by up to 2 * lr the other way. Such weights must be rare: one per tensor, or 1%.
LEARNING_RATE = 1e-3
RARE = 0.01


@pytest.mark.parametrize("name", list(REALISTIC))
@pytest.mark.usefixtures("standard_dtype_promotion")
def test_realistic_model_matches_eager_on_cpu(name):
  entry = REALISTIC[name]
  calls = entry.calls()
  functions = {fn_name: nnxc.function(fn, *args) for fn_name, (fn, args) in calls.items()}
  program, eager = nnxc.export(entry.objects(), functions, target="cpu").load(), entry.objects()
  keys = tuple(eager)
  for _ in range(STEPS):
    for fn_name, (fn, args) in calls.items():
      got = program.functions[fn_name](*[np.asarray(a) for a in args])
      want = call_with_objects(eager, fn, args, keys)
      assert_trees_allclose(got, jax.tree.map(np.asarray, want), **TOLERANCE)
  compiled = {path_name(p): v.get_value() for p, v in nnx.to_flat_state(program.state())}
  for path, variable in nnx.to_flat_state(nnx.state(eager)):
    name_, want, got = path_name(path), variable.get_value(), compiled[path_name(path)]
    if isinstance(variable, nnx.Param):
      got, want = np.asarray(got), np.asarray(want)
      np.testing.assert_allclose(got, want, rtol=0, atol=2 * LEARNING_RATE * STEPS, err_msg=name_)
      far = ~np.isclose(got, want, **TOLERANCE)
      assert far.sum() <= max(1, RARE * far.size), (
        f"{name_}: {far.sum()} of {far.size} weights differ beyond {TOLERANCE}"
      )
    else:
      assert_trees_allclose({name_: got}, {name_: want}, **TOLERANCE)
