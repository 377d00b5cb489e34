"""Linen modules of the Flax guides compile through flax.nnx.bridge and match Linen's own apply."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import compile as nnxc
from nnx_models._linen import (
  CNN,
  BiasAdderWithRunningMean,
  ExplicitMLP,
  SimpleDense,
  SimpleMLP,
  linen_variables,
  to_nnx,
)
from tests.conftest import RUNNABLE, TOLERANCES, assert_trees_allclose, require_device

TARGETS = RUNNABLE
FORWARD = {
  "dense_regression": lambda: nn.Dense(features=5),  # the guide's linear regression
  "explicit_mlp": lambda: ExplicitMLP(features=[3, 4, 5]),
  "simple_mlp": lambda: SimpleMLP(features=[3, 4, 5]),
  "simple_dense": lambda: SimpleDense(features=3),
}


def _x(seed: int) -> jax.Array:
  return jax.random.uniform(jax.random.key(seed), (4, 4))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", list(FORWARD))
def test_linen_forward_matches_linen_apply(name, target):
  require_device(target)
  module = FORWARD[name]()
  eager = to_nnx(module, _x(0))
  program = nnxc.export(to_nnx(module, _x(0)), {"apply": nnxc.method("__call__", _x(0))}, target=target).load()
  for call in range(3):
    x = _x(call + 1)
    expected = module.apply(linen_variables(eager), x)
    assert_trees_allclose(program.apply(x), expected, **TOLERANCES[target])
    eager(x)  # advances the bridge's RNG count, as the program does
    assert_trees_allclose(program.state(), nnx.state(eager), **TOLERANCES[target])


@pytest.mark.parametrize("target", TARGETS)
def test_linen_batch_stats_come_back_like_apply_mutable(target):
  require_device(target)
  module = BiasAdderWithRunningMean()
  model = to_nnx(module, _x(0))
  update = nnxc.function(lambda model, x: model(x, mutable=["batch_stats"]), _x(0))
  # The guide's running mean starts as [4] and its first update makes it [1, 4]
  # (keepdims=True): a compiled State cannot change shape, and says so.
  with pytest.raises(nnxc.StateMismatchError, match=r"mean \(BatchStat\) from float32\[4\] to float32\[1, 4\]"):
    nnxc.export(model, {"step": update}, target=target)
  model(_x(0), mutable=["batch_stats"])  # one eager update gives it its final shape
  variables = linen_variables(model)
  program = nnxc.export(model, {"step": update}, target=target).load()
  for call in range(3):
    x = _x(call + 1)
    expected, mutated = module.apply(variables, x, mutable=["batch_stats"])
    variables = {**variables, **mutated}
    assert_trees_allclose(program.step(x), expected, **TOLERANCES[target])
    got = program.state(nnx.BatchStat)["mean"].get_value()
    assert_trees_allclose(got, mutated["batch_stats"]["mean"], **TOLERANCES[target])


def _digits(batch: int, step: int) -> tuple[jax.Array, jax.Array]:
  from sklearn.datasets import load_digits

  digits = load_digits()  # bundled with scikit-learn: 1797 8x8 images, no download
  start = (step * batch) % (len(digits.images) - batch)
  images = jnp.asarray(digits.images[start : start + batch, :, :, None] / 16.0, jnp.float32)
  return images, jnp.asarray(digits.target[start : start + batch], jnp.int32)


def _loss_and_accuracy(logits, labels):
  loss = optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, 10)).mean()
  return loss, jnp.mean(jnp.argmax(logits, -1) == labels)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.usefixtures("standard_dtype_promotion")
def test_cnn_trained_with_train_state_matches_the_compiled_train_step(target):
  require_device(target)
  tx = optax.sgd(0.1, momentum=0.9)
  images, labels = _digits(32, 0)
  model = to_nnx(CNN(), images)

  # Eager reference: the guides' Linen TrainState loop.
  state = train_state.TrainState.create(apply_fn=CNN().apply, params=linen_variables(model)["params"], tx=tx)

  @jax.jit
  def linen_step(state, images, labels):
    def loss_fn(params):
      return _loss_and_accuracy(state.apply_fn({"params": params}, images), labels)

    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads), loss, accuracy

  # Compiled: the same module through the bridge, trained by nnx.Optimizer on the device.
  def train_step(model, optimizer, images, labels):
    (loss, accuracy), grads = nnx.value_and_grad(lambda m: _loss_and_accuracy(m(images), labels), has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, accuracy

  objects = {"model": model, "optimizer": nnx.Optimizer(model, tx, wrt=nnx.Param)}
  program = nnxc.export(objects, {"train_step": nnxc.function(train_step, images, labels)}, target=target).load()
  losses = []
  for step in range(20):
    images, labels = _digits(32, step)
    state, loss, accuracy = linen_step(state, images, labels)
    losses.append(loss)
    got_loss, got_accuracy = program.train_step(images, labels)
    np.testing.assert_allclose(got_loss, loss, rtol=1e-4)
    np.testing.assert_array_equal(got_accuracy, accuracy)
  trained = linen_variables(_merged(model, program))["params"]
  assert_trees_allclose(trained, state.params, rtol=1e-4, atol=1e-4)
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3  # it learned: chance is ln(10) = 2.3


def _merged(model, program):
  program.update({"model": model}, nnx.Param)
  return model
