"""Programs behave like the jax.jit function they came from (issue 17): no silent trace-time surprises."""

import dataclasses
import functools
import json
import subprocess
import sys
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import compile as nnxc
from tests.conftest import TOLERANCES, assert_trees_allclose, require_device

TARGETS = ["cpu", "metal-vulkan"]


# 1. Static attributes changed while tracing.


class _PlainCounter(nnx.Module):
  """Counts its calls in a plain Python int: eagerly every call sees a new count."""

  def __init__(self):
    self.w = nnx.Param(jnp.array([-1.5, -0.75, -1.69]))
    self.calls = 0

  def __call__(self, x):
    self.calls += 1
    return jnp.sum(x * self.w) * self.calls


class _VariableCounter(nnx.Module):
  """The fix the error names: the count held in an nnx.Variable."""

  def __init__(self):
    self.w = nnx.Param(jnp.array([-1.5, -0.75, -1.69]))
    self.calls = nnx.Variable(jnp.array(0, jnp.int32))

  def __call__(self, x):
    self.calls[...] += 1
    return jnp.sum(x * self.w) * self.calls[...].astype(jnp.float32)


class _LazyFlag(nnx.Module):
  """A first-call branch switched off with a plain bool: the trace takes the branch, later calls would not."""

  def __init__(self):
    self.w = nnx.Param(jnp.ones(3))
    self.first = True

  def __call__(self, x):
    if self.first:
      self.first = False
      return x * 0.0
    return x * self.w


def test_a_plain_attribute_changed_while_tracing_is_refused_naming_it():
  x = np.ones(3, np.float32)
  with pytest.raises(nnxc.StateMismatchError, match=r"changes the attribute calls from 0 to 1.*nnx\.Variable"):
    nnxc.export(_PlainCounter(), {"f": nnxc.method("__call__", x)})
  with pytest.raises(nnxc.StateMismatchError, match=r"changes the attribute first from True to False"):
    nnxc.lower(_LazyFlag(), x)


def test_an_attribute_of_a_nested_object_is_named_by_its_path():
  x = np.ones(3, np.float32)

  def step(model, other, x):
    return model(x) + other(x)

  with pytest.raises(nnxc.StateMismatchError, match=r"attribute other\.calls from 0 to 1"):
    nnxc.export({"model": _VariableCounter(), "other": _PlainCounter()}, {"step": nnxc.function(step, x)})


def test_setting_a_mode_inside_the_function_is_repeatable_and_allowed():
  model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Dropout(0.5, rngs=nnx.Rngs(1)))

  def predict(model, x):
    model.eval()  # changes Dropout's deterministic flag: idempotent, so every call traces the same
    return model(x)

  nnxc.lower(model, np.ones((2, 3), np.float32))  # as it is: train mode
  artifact = nnxc.export(model, {"predict": nnxc.function(predict, np.ones((2, 3), np.float32))})
  assert artifact.functions["predict"].updates == ()  # deterministic: no RNG drawn


@pytest.mark.parametrize("target", TARGETS)
def test_the_variable_fix_counts_calls_like_eager(target):
  require_device(target)
  x = np.array([1.0, 2.0, 1.0], np.float32)
  eager = _PlainCounter()
  expected = [float(eager(x)) for _ in range(3)]  # -3.94, -7.87, -11.81
  program = nnxc.export(_VariableCounter(), {"f": nnxc.method("__call__", x)}, target=target).load()
  got = [float(program.f(x)) for _ in range(3)]
  assert_trees_allclose(np.array(got, np.float32), np.array(expected, np.float32), **TOLERANCES[target])
  assert int(program.arrays(["calls"])["calls"]) == 3


# 2. Output pytrees keep their types and paths.


class Losses(typing.NamedTuple):
  loss: jax.Array
  logits: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Pair:
  first: jax.Array
  second: jax.Array


def _grad_step(model, x):
  """(loss, grads) with grads an nnx.State, beside a NamedTuple, a dataclass and a Variable."""
  loss, grads = nnx.value_and_grad(nnx.remat(lambda model: jnp.mean(model(x) ** 2)))(model)
  return {"loss": loss, "grads": grads, "named": Losses(loss, model(x)), "pair": Pair(loss, x), "w": model.kernel}


_X = np.arange(8, dtype=np.float32).reshape(4, 2) / 8


def _grad_artifact(target: str) -> nnxc.Artifact:
  return nnxc.export(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), {"step": nnxc.function(_grad_step, _X)}, target=target)


@pytest.mark.parametrize("target", TARGETS)
def test_outputs_come_back_as_the_eager_pytree(target):
  require_device(target)
  program = _grad_artifact(target).load()
  got, want = program.step(_X), _grad_step(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), _X)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert isinstance(got["grads"], nnx.State) and isinstance(got["grads"]["kernel"], nnx.Param)
  assert type(got["named"]) is Losses and type(got["pair"]) is Pair and type(got["w"]) is nnx.Param
  assert_trees_allclose(got, jax.tree.map(np.asarray, want), **TOLERANCES[target])


_FRESH = """
import sys
if sys.argv[2] == "no-flax":
  sys.modules["flax"] = sys.modules["jax"] = None  # importing either now fails
import numpy as np
from compile.runtime import load_program
result = load_program(sys.argv[1]).step(np.arange(8, dtype=np.float32).reshape(4, 2) / 8)
print(repr(type(result["grads"]).__name__), repr(type(result["named"]).__name__), type(result["w"]).__name__)
print(sorted(result["grads"]), sorted(result["named"]) if isinstance(result["named"], dict) else "")
"""


def test_a_process_that_does_not_know_the_types_gets_the_documented_plain_form(tmp_path):
  _grad_artifact("cpu").save(tmp_path / "step")
  fresh = [sys.executable, "-c", _FRESH, str(tmp_path / "step")]
  without_jax = subprocess.run([*fresh, "no-flax"], capture_output=True, text=True, check=True).stdout.splitlines()
  assert without_jax == ["'dict' 'dict' ndarray", "['bias', 'kernel'] ['logits', 'loss']"]
  with_flax = subprocess.run([*fresh, "flax"], capture_output=True, text=True, check=True).stdout.splitlines()
  assert with_flax == ["'State' 'dict' Param", "['bias', 'kernel'] ['logits', 'loss']"]  # Losses not registered


@functools.cache
def _linear_artifact() -> nnxc.Artifact:
  return nnxc.export(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), {"step": nnxc.method("__call__", _X)})


@pytest.mark.parametrize(
  ("structure", "field"),
  [
    ({"state": [[["a", -1], {"leaf": 0}]]}, r"structure\.state\[0\]\[0\]\[1\]"),
    ({"variable": {"class": "x:P", "type": "P"}}, r"structure\.variable must be an object with exactly"),
    ({"namedtuple": {"class": "x:N", "fields": [["not a name", {"leaf": 0}]]}}, r"fields\[0\]\[0\]"),
    ({"dataclass": {"class": "x:D", "fields": [["a", {"leaf": 0}, 1]]}}, r"fields\[0\] must be a \[key, value\]"),
  ],
)
def test_malformed_output_structures_are_refused_naming_the_field(structure, field, tmp_path):
  directory = tmp_path / "a"
  _linear_artifact().save(directory)
  manifest = json.loads((directory / "manifest.json").read_text())
  manifest["functions"]["step"]["structure"] = structure
  (directory / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(nnxc.ArtifactError, match=field):
    nnxc.Artifact.open(directory)


# 3. Inputs accepted where jax.jit accepts them.


def _mixed_inputs(model, x, steps, config, pair):
  """Array, Python-int scalar, dict of arrays and a (tuple, list) pair: what JAX programs take."""
  y = model(x) * config["scale"] + config["shift"]
  return y * steps.astype(jnp.float32) + pair[0] - jnp.sum(pair[1][0])


def _mixed_example():
  config = {"scale": np.float32(2.0), "shift": np.ones(3, np.float32)}
  return np.ones((4, 2), np.float32), np.int32(1), config, (np.zeros(3, np.float32), [np.zeros(2, np.float32)])


@functools.cache
def _mixed_program(target: str) -> nnxc.Program:
  functions = {"f": nnxc.function(_mixed_inputs, *_mixed_example())}
  return nnxc.export(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), functions, target=target).load()


@pytest.mark.parametrize("target", TARGETS)
def test_inputs_follow_jax_rules_scalars_x64_and_nested_containers(target):
  require_device(target)
  program, model = _mixed_program(target), nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  x64 = np.linspace(-1, 1, 8).reshape(4, 2)  # float64: jax.jit takes it as float32 (x64 off)
  config = {"shift": np.arange(3.0), "scale": 0.5}  # a Python float, keys in another order
  pair = [np.full(3, 0.25), (np.ones(2),)]  # a list where a tuple was traced, and the reverse
  want = jax.jit(lambda *a: _mixed_inputs(model, *a))(x64, 3, config, pair)
  assert_trees_allclose(program.f(x64, 3, config, pair), np.asarray(want), **TOLERANCES[target])


def test_input_errors_describe_the_expected_structure():
  program = _mixed_program("cpu")
  x, steps, config, pair = _mixed_example()
  config_ = r"\{'scale': float32\[\], 'shift': float32\[3\]\}"
  expected = r"\(float32\[4, 2\], int32\[\], " + config_ + r", \(float32\[3\], \(float32\[2\],\)\)\)"
  with pytest.raises(nnxc.SignatureError, match=r"f takes 4 inputs, got 1: " + expected):
    program.f(x)
  with pytest.raises(
    nnxc.SignatureError, match=r"args\[0\]: expected an array float32\[4, 2\], got a list of 4.*np\.asarray"
  ):
    program.f(x.tolist(), steps, config, pair)
  with pytest.raises(nnxc.SignatureError, match=r"args\[2\]: .*missing keys \['shift'\], unexpected keys \['offset'\]"):
    program.f(x, steps, {"scale": 1.0, "offset": x}, pair)
  with pytest.raises(nnxc.SignatureError, match=r"args\[1\]: expected int32\[\], got 1\.5"):
    program.f(x, 1.5, config, pair)  # jax.jit would trace a float function: another program
  with pytest.raises(nnxc.SignatureError, match=r"2147483648 does not fit in int32"):
    program.f(x, 2**31, config, pair)
  with pytest.raises(nnxc.SignatureError, match=r"args\[3\]\[1\]: expected 1 items"):
    program.f(x, steps, config, (pair[0], [pair[1][0], pair[1][0]]))


def _noisy(model, key, x):
  return model(x) + jax.random.normal(key, (3,))


@pytest.mark.parametrize("target", TARGETS)
def test_typed_keys_are_inputs_and_rngs_are_refused_with_the_fix(target):
  require_device(target)
  model, x = nnx.Linear(2, 3, rngs=nnx.Rngs(0)), np.ones((1, 2), np.float32)
  program = nnxc.export(model, {"f": nnxc.function(_noisy, jax.random.key(0), x)}, target=target).load()
  for seed in (1, 2):
    key = jax.random.key(seed)
    assert_trees_allclose(program.f(key, x), np.asarray(_noisy(model, key, x)), **TOLERANCES[target])
  with pytest.raises(nnxc.SignatureError, match=r"args\[0\] is an Rngs, an NNX object.*jax\.random\.key"):
    nnxc.export(model, {"f": nnxc.function(lambda m, rngs, x: m(x), nnx.Rngs(0), x)}, target=target)
  with pytest.raises(nnxc.SignatureError, match=r"args\[0\]: expected uint32\[2\], got Rngs"):
    program.f(nnx.Rngs(1), x)


# 5. Smaller frictions.


def test_host_callbacks_are_refused_by_name():
  def noisy(model, x):
    jax.debug.print("x = {}", x)
    return model(x)

  with pytest.raises(nnxc.UnsupportedOpError, match=r"host callback \(jax\.debug\.print.*Remove it"):
    nnxc.export(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), {"f": nnxc.function(noisy, _X)})


_METRICS = """
import sys
from compile.runtime import load_program
print(type(load_program(sys.argv[1]).state()["metrics"]["loss"]["total"]).__name__)
"""


def test_flax_metric_state_loads_in_a_fresh_process_without_registration(tmp_path):
  def record(model, metrics, x):
    loss = jnp.mean(model(x) ** 2)
    metrics.update(loss=loss)
    return loss

  objects = {"model": nnx.Linear(2, 3, rngs=nnx.Rngs(0)), "metrics": nnx.MultiMetric(loss=nnx.metrics.Average("loss"))}
  nnxc.export(objects, {"record": nnxc.function(record, _X)}).save(tmp_path / "m")
  fresh = subprocess.run([sys.executable, "-c", _METRICS, str(tmp_path / "m")], capture_output=True, text=True)
  assert fresh.stdout.strip() == "MetricState", fresh.stderr[-2000:]


def test_method_without_mode_warns_where_the_model_is_in_train_mode():
  model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Dropout(0.5, rngs=nnx.Rngs(1)))
  with pytest.warns(UserWarning, match=r"predict: method\(\.\.\.\) without mode= .*layers\.1\.deterministic"):
    nnxc.export(model, {"predict": nnxc.method("__call__", _X)})
