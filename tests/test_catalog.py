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


@functools.cache
def _eager_run(name: str) -> list[tuple[dict, dict]]:
  """Per step: ``({function: eager outputs as numpy}, {state path: eager value})``.

  Every target replays the same eager run, so it is computed once per entry (an entry's
  tests share an xdist group, so they run in one worker).
  """
  entry = CATALOG[name]
  eager = entry.objects()
  keys = tuple(eager) if isinstance(eager, dict) else None
  run = []
  with jax.numpy_dtype_promotion("standard"):
    for step in range(STEPS):
      outputs = {}
      for function, fn in entry.calls.items():
        outputs[function] = jax.tree.map(np.asarray, call_with_objects(eager, fn, entry.inputs(function, step), keys))
      state = {path_name(p): _value(v) for p, v in nnx.to_flat_state(nnx.state(eager))}  # JAX arrays: immutable
      run.append((outputs, state))
  return run


def _entries():
  """The catalog's names, each in its own xdist group (``--dist loadgroup``)."""
  return [pytest.param(name, marks=pytest.mark.xdist_group(name)) for name in CATALOG]


@pytest.mark.parametrize("target", RUNNABLE)
@pytest.mark.parametrize("name", _entries())
@pytest.mark.usefixtures("standard_dtype_promotion")
def test_compiled_matches_eager_call_after_call(name, target):
  require_device(target)
  entry = CATALOG[name]
  program = _artifact(name, target).load()
  tolerance = dict(rtol=entry.rtol, atol=entry.rtol)
  for step, (outputs, state) in enumerate(_eager_run(name)):
    for function in entry.calls:
      inputs = entry.inputs(function, step)
      got = program.functions[function](*[np.asarray(x) for x in inputs])
      assert_trees_allclose(got, outputs[function], **tolerance)
    compiled = {path_name(p): _value(v) for p, v in nnx.to_flat_state(program.state())}
    assert compiled.keys() == state.keys()
    for path, want in state.items():
      noise = entry.noise_gradients.get(path)
      bound = dict(rtol=0, atol=2 * noise * (step + 1)) if noise else tolerance
      assert_trees_allclose({path: compiled[path]}, {path: want}, **bound)


@pytest.mark.parametrize("name", _entries())
def test_builds_for_metal_with_msl_and_no_kernel_race(name):
  artifact = _artifact(name, "metal")
  assert artifact.spirv() and not any(nnxc.find_races(spirv) for spirv in artifact.spirv().values())
  assert {p[4:-6] for p in artifact.files if p.startswith("msl/")} == set(artifact.manifest.dispatches)
