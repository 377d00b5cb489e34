"""The Linen models of the Flax basics guides, and the bridge that makes them NNX modules.

The guides write these with ``init``/``apply`` (older Flax); here they are the same
modules, and :func:`to_nnx` wraps one with ``flax.nnx.bridge.ToNNX`` so that it
splits, lowers, compiles and merges back like any NNX module. A Linen collection
such as ``batch_stats`` becomes the matching NNX Variable type (``BatchStat``).
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


class ExplicitMLP(nn.Module):
  """Dense layers with relu between them, submodules declared in ``setup``."""

  features: Sequence[int]

  def setup(self):
    self.layers = [nn.Dense(feat) for feat in self.features]

  def __call__(self, inputs: jax.Array) -> jax.Array:
    x = inputs
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i != len(self.layers) - 1:
        x = nn.relu(x)
    return x


class SimpleMLP(nn.Module):
  """The same MLP declared inline with ``@nn.compact``."""

  features: Sequence[int]

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    x = inputs
    for i, feat in enumerate(self.features):
      x = nn.Dense(feat, name=f"layers_{i}")(x)
      if i != len(self.features) - 1:
        x = nn.relu(x)
    return x


class SimpleDense(nn.Module):
  """A hand-written Dense: ``self.param`` and ``lax.dot_general``."""

  features: int
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (inputs.shape[-1], self.features))
    y = jax.lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())))
    bias = self.param("bias", self.bias_init, (self.features,))
    return y + bias


class BiasAdderWithRunningMean(nn.Module):
  """Keeps a running mean of its inputs in the ``batch_stats`` collection."""

  decay: float = 0.99

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    is_initialized = self.has_variable("batch_stats", "mean")
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s), x.shape[1:])
    bias = self.param("bias", lambda rng, shape: jnp.zeros(shape), x.shape[1:])
    if is_initialized:
      ra_mean.value = self.decay * ra_mean.value + (1.0 - self.decay) * jnp.mean(x, axis=0, keepdims=True)
    return x - ra_mean.value + bias


class CNN(nn.Module):
  """A small image classifier (the guides' MNIST CNN, sized for 8x8 digits)."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Conv(features=16, kernel_size=(3, 3))(x))
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nn.relu(nn.Conv(features=32, kernel_size=(3, 3))(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(features=64)(x))
    return nn.Dense(features=self.num_classes)(x)


def to_nnx(module: nn.Module, *example_args: Any, seed: int = 0) -> nnx.Module:
  """``module`` as an NNX module (``nnx.bridge.ToNNX``), its variables initialized on ``example_args``.

  Its parameters are drawn from ``nnx.Rngs(params=seed)``; :func:`linen_variables`
  gives them back as the Linen ``variables`` for ``module.apply``. Call it with
  ``mutable=["batch_stats"]`` where the Linen module updates a collection.
  """
  model = nnx.bridge.ToNNX(module, rngs=nnx.Rngs(params=seed))
  nnx.bridge.lazy_init(model, *example_args)
  return model


def linen_variables(model: nnx.Module) -> dict:
  """The Linen ``variables`` dict (``{"params": ..., "batch_stats": ...}``) of a :func:`to_nnx` model."""
  return nnx.bridge.variables.nnx_attrs_to_linen_vars(
    {k: v for k, v in vars(model).items() if not k.startswith(("to_nnx__", "_pytree__"))}
  )
