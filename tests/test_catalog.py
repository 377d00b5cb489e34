"""Flax's layer catalog on cpu, vulkan and the Metal stand-in: outputs and full state match eager, call by call."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

import compile as nnxc
from compile import call_with_objects
from compile.runtime import path_name
from nnx_models import CATALOG
from nnx_models.tools.build_zoo import catalog_functions
from tests.conftest import RUNNABLE, assert_trees_allclose, require_device

STEPS = 3


@functools.cache
def _artifact(name: str, target: str) -> nnxc.Artifact:
  entry = CATALOG[name]
  with jax.numpy_dtype_promotion("standard"):  # optax and Flax's layers are written for JAX's default promotion
    return nnxc.export(entry.objects(), catalog_functions(entry), target=target)


def _value(leaf):
  """A Variable's value, or the leaf itself where the state holds a plain array (``nnx.WeightNorm``)."""
  return leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf


@pytest.mark.parametrize("target", RUNNABLE)
@pytest.mark.parametrize("name", list(CATALOG))
@pytest.mark.usefixtures("standard_dtype_promotion")
def test_compiled_matches_eager_call_after_call(name, target):
  require_device(target)
  entry = CATALOG[name]
  program, eager = _artifact(name, target).load(), entry.objects()
  keys = tuple(eager) if isinstance(eager, dict) else None
  tolerance = dict(rtol=entry.rtol, atol=entry.rtol)
  for step in range(STEPS):
    for function, fn in entry.calls.items():
      inputs = entry.inputs(function, step)
      got = program.functions[function](*[np.asarray(x) for x in inputs])
      want = call_with_objects(eager, fn, inputs, keys)
      assert_trees_allclose(got, jax.tree.map(np.asarray, want), **tolerance)
    compiled = {path_name(p): _value(v) for p, v in nnx.to_flat_state(program.state())}
    for path, variable in nnx.to_flat_state(nnx.state(eager)):
      name_ = path_name(path)
      noise = entry.noise_gradients.get(name_)
      bound = dict(rtol=0, atol=2 * noise * (step + 1)) if noise else tolerance
      assert_trees_allclose({name_: compiled[name_]}, {name_: _value(variable)}, **bound)


@pytest.mark.parametrize("name", list(CATALOG))
def test_builds_for_metal_with_msl_and_no_kernel_race(name):
  artifact = _artifact(name, "metal")
  assert artifact.spirv() and not any(nnxc.find_races(spirv) for spirv in artifact.spirv().values())
  assert {p[4:-6] for p in artifact.files if p.startswith("msl/")} == set(artifact.manifest.dispatches)
