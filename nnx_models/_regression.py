"""The linear-regression example of the Flax basics guide, in NNX."""

import jax
import jax.numpy as jnp
from flax import nnx


class LinearRegression(nnx.Module):
  """One dense layer ``x @ kernel + bias`` (the guide's ``nn.Dense(features=5)``)."""

  def __init__(self, x_dim: int, y_dim: int, *, rngs: nnx.Rngs):
    self.dense = nnx.Linear(x_dim, y_dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.dense(x)

  def loss(self, x: jax.Array, y: jax.Array) -> jax.Array:
    """The guide's loss: half the squared error per sample, averaged over the batch."""
    err = y - self(x)
    return jnp.mean(jnp.sum(err * err, axis=-1) / 2.0)


def make_regression_data(
  n_samples: int = 20, x_dim: int = 10, y_dim: int = 5, *, seed: int = 0
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The guide's synthetic data: ``y = x @ W + b + 0.1 * noise``.

  Returns:
    ``(x, y, W, b)``: the samples and the ground-truth parameters.
  """
  k1, k2 = jax.random.split(jax.random.key(seed))
  w = jax.random.normal(k1, (x_dim, y_dim))
  b = jax.random.normal(k2, (y_dim,))
  key_sample, key_noise = jax.random.split(k1)
  x = jax.random.normal(key_sample, (n_samples, x_dim))
  y = x @ w + b + 0.1 * jax.random.normal(key_noise, (n_samples, y_dim))
  return x, y, w, b
