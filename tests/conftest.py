"""Shared test configuration: strict JAX, lavapipe's lane width, per-target tolerances, tree-aware comparisons."""

import os
import re
import shutil
import tempfile

# lavapipe reads its lane width when the Vulkan driver loads, so set it before any test
# opens a device. 512 bits = 16 lanes, the widest lavapipe really runs subgroup operations
# on, and the width the metal-vulkan stand-in is compiled for. `nox -s tests` runs the
# vulkan tests a second time at lavapipe's default 8 lanes (LP_NATIVE_VECTOR_WIDTH=256).
os.environ.setdefault("LP_NATIVE_VECTOR_WIDTH", "512")
# The run's caches: compiled artifacts, XLA's executables for the eager references, lavapipe's shaders.
# `nox -s tests` makes a fresh one for its two runs (NNX_METAL_TEST_CACHE); a plain pytest keeps one in the
# temporary directory, never the user's ~/.cache/nnx-metal. Tests in different xdist workers, and the
# processes tests start, that build the same program compile it once.
SHARED_CACHE = os.environ.get("NNX_METAL_TEST_CACHE") or os.path.join(tempfile.gettempdir(), "nnx-metal-test-cache")
os.environ["NNX_METAL_CACHE"] = os.path.join(SHARED_CACHE, "compile")
# Mesa's shader cache keys ignore the lane width, so each width gets a directory of its own; with it,
# a program loaded again (by another test, by the C runtime) skips lavapipe's seconds of shader compiles.
if "MESA_SHADER_CACHE_DISABLE" not in os.environ:
  os.environ["MESA_SHADER_CACHE_DIR"] = os.path.join(SHARED_CACHE, f"mesa-{os.environ['LP_NATIVE_VECTOR_WIDTH']}-bit")

# The run keeps both cores busy with one worker each, so each iree-compile runs on one thread: the
# same modules for 14% less CPU than two compiles competing with threads (compile/_iree.py).
os.environ.setdefault("NNX_METAL_COMPILE_SERIAL", "1")
# The eager references compile hundreds of small XLA executables (one per op and shape; a model's
# initializers alone take dozens) and run them once or a few times: XLA's backend optimizations cost
# more than they save here. Without them five catalog entries' eager runs took 16 s instead of 24 s,
# cold, with results within 1.5e-5 relative of the optimized ones (the tolerances below are 2e-5 of
# the largest magnitude). Only the tests' JAX is affected: nothing the library exports goes through XLA.
os.environ["XLA_FLAGS"] = " ".join(
  [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

import compile as nnxc  # noqa: E402
from compile.runtime import RUNTIME_TARGETS, open_device  # noqa: E402

# Mixed-dtype arithmetic must be explicit (the guide models broadcast ranks, so rank promotion stays on).
jax.config.update("jax_numpy_dtype_promotion", "strict")

# Compiled vs eager, per target. IREE fuses and reorders float reductions
# differently from XLA, so results agree to float32 rounding, not bit for bit.
# The check is normwise per leaf, |a - b| <= atol + rtol * max|b|: rounding error
# scales with the magnitudes summed, not with each result (StackedMLP in eval mode
# sums activations of ~1e7 into outputs near 0). Integers, keys and counts must match exactly.
TOLERANCES = {
  "cpu": dict(rtol=2e-5, atol=2e-5),
  "vulkan": dict(rtol=2e-5, atol=2e-5),
  "metal-vulkan": dict(rtol=2e-5, atol=2e-5),
}
# The targets a test can run here, on lavapipe (vulkan) and IREE's CPU drivers.
RUNNABLE = ["cpu", "vulkan", "metal-vulkan"]

# CI sets NNX_METAL_REQUIRE="vulkan,metal-vulkan,spirv-val,...": there a missing one fails instead of skipping.
REQUIRED = {name for name in os.environ.get("NNX_METAL_REQUIRE", "").split(",") if name}


def skip_or_fail(name: str, reason: str):
  if name in REQUIRED:
    pytest.fail(f"{reason} (required here by NNX_METAL_REQUIRE)")
  pytest.skip(reason)


def require_device(target: str) -> None:
  """Skips (or fails, where required) when ``target``'s runtime device is missing or misconfigured."""
  runtime = RUNTIME_TARGETS[target]
  try:
    open_device(runtime.drivers[0], subgroup_size=runtime.subgroup_size)
  except nnxc.DeviceUnavailableError as e:
    skip_or_fail(target, f"no {target} device: {e}")


def spirv_tool(name: str) -> str:
  """The path of a SPIRV-Tools program (spirv-val, spirv-as, spirv-dis)."""
  path = shutil.which(name)
  if path is None:
    skip_or_fail("spirv-val", f"{name} not installed (Debian package spirv-tools)")
  return path


def pytest_configure(config):
  """Eager references compile through XLA op by op (hundreds of executables for one train step), and
  every target's test and both lane-width runs compute the same ones: JAX's persistent compilation
  cache lets the first computation serve the rest, across xdist workers and runs. It caches XLA's
  executables for the eager side only; nothing the library exports goes through it.
  """
  jax.config.update("jax_compilation_cache_dir", os.path.join(SHARED_CACHE, "jax"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's hook reads the groups
def pytest_collection_modifyitems(items):
  """Marks each test parametrized over a target with ``target_<name>``, e.g. ``-m target_vulkan``.

  The targets of one test share an xdist group (``nox -s tests`` runs ``--dist loadgroup``): they
  run in one worker, which lowers the model and computes the eager reference once for all of them
  (JAX caches both in memory) instead of once per worker.

  Tests marked ``after_compiles`` run last: they rebuild what other tests compile (the whole zoo), and by
  then the run's shared compile cache holds most of it.
  """
  for item in items:
    params = getattr(item, "callspec", None) and item.callspec.params
    target = params and params.get("target")
    if isinstance(target, str):
      item.add_marker(f"target_{target.replace('-', '_')}")
      if item.get_closest_marker("xdist_group") is None:
        item.add_marker(pytest.mark.xdist_group(_group_of(item, params)))
  items.sort(key=lambda item: item.get_closest_marker("after_compiles") is not None)  # stable: order kept


def _group_of(item, params: dict) -> str:
  """The test's name and its parameters other than the target (no ``]`` or ``@``: xdist splits on them)."""
  rest = ",".join(f"{key}={value}" for key, value in sorted(params.items(), key=str) if key != "target")
  return re.sub(r"[^\w.=,:-]", "_", f"{item.module.__name__}:{item.originalname}:{rest}")


def _comparable(x):
  if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
    return np.asarray(jax.random.key_data(x))
  return np.asarray(x)


def assert_trees_allclose(actual, expected, *, rtol: float, atol: float) -> None:
  """Structure first, then every leaf: dtype, shape, then values (keys compared as key_data).

  Floats are compared normwise per leaf (see TOLERANCES); everything else exactly.
  """
  actual_leaves, actual_tree = jax.tree_util.tree_flatten_with_path(actual)
  expected_leaves, expected_tree = jax.tree_util.tree_flatten_with_path(expected)
  assert actual_tree == expected_tree, f"structure differs:\n{actual_tree}\nvs\n{expected_tree}"
  for (path, a), (_, b) in zip(actual_leaves, expected_leaves, strict=True):
    a, b = _comparable(a), _comparable(b)
    where = jax.tree_util.keystr(path)
    assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
    if not jax.numpy.issubdtype(b.dtype, jax.numpy.inexact):  # knows bfloat16
      np.testing.assert_array_equal(a, b, err_msg=where)
      continue
    a, b = a.astype(np.float64), b.astype(np.float64)  # also bfloat16, which numpy's testing cannot take
    scale = float(np.max(np.abs(b), initial=0.0))
    np.testing.assert_allclose(a, b, rtol=0, atol=atol + rtol * scale, err_msg=f"{where} (max|expected| = {scale:.3g})")


@pytest.fixture
def standard_dtype_promotion():
  """For code written for JAX's default promotion: optax's schedules and Adam add Python
  floats to int32 step counts, and flax.linen's pooling divides by an int window size."""
  with jax.numpy_dtype_promotion("standard"):
    yield


def mse_train_step(model, optimizer, x, y):
  """The README's train step: one optimizer step on the mean squared error; returns the loss."""
  loss, grads = nnx.value_and_grad(lambda model: jax.numpy.mean((model(x) - y) ** 2))(model)
  optimizer.update(model, grads)
  return loss
