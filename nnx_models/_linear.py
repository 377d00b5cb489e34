"""Linear layers and counters from the NNX basics guide."""

import jax
import jax.numpy as jnp
from flax import nnx


class Linear(nnx.Module):
  """``x @ w + b`` with ``w`` drawn uniformly, as in the guide.

  Example:
    >>> model = Linear(2, 5, rngs=nnx.Rngs(params=0))
    >>> model(jnp.ones((1, 2))).shape
    (1, 5)
  """

  def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs):
    self.w = nnx.Param(jax.random.uniform(rngs.params(), (din, dout)))
    self.b = nnx.Param(jnp.zeros((dout,)))
    self.din, self.dout = din, dout

  def __call__(self, x: jax.Array) -> jax.Array:
    return x @ self.w + self.b


class Count(nnx.Variable):
  """A counter: state that is neither a parameter nor a batch statistic."""


class Counter(nnx.Module):
  """Increments its :class:`Count` on every call and returns nothing."""

  def __init__(self):
    self.count = Count(jnp.array(0))

  def __call__(self) -> None:
    self.count[...] += 1


class StatefulLinear(nnx.Module):
  """A :class:`Linear` that counts its calls in an unsigned ``Count``."""

  def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs):
    self.w = nnx.Param(jax.random.uniform(rngs(), (din, dout)))
    self.b = nnx.Param(jnp.zeros((dout,)))
    self.count = Count(jnp.array(0, dtype=jnp.uint32))

  def __call__(self, x: jax.Array) -> jax.Array:
    self.count[...] += 1
    return x @ self.w + self.b
