"""The guide's MLP (Dropout and BatchNorm state) and a scanned stack of them."""

import jax
from flax import nnx

from ._linear import Linear


class MLP(nnx.Module):
  """Linear -> BatchNorm -> Dropout(0.1) -> gelu -> Linear, as in the NNX basics guide.

  ``model.train()`` uses batch statistics and drops activations (advancing the
  Dropout RNG count); ``model.eval()`` uses the running statistics and keeps all.
  """

  def __init__(self, din: int, dmid: int, dout: int, *, rngs: nnx.Rngs):
    self.linear1 = Linear(din, dmid, rngs=rngs)
    self.dropout = nnx.Dropout(rate=0.1, rngs=rngs)
    self.bn = nnx.BatchNorm(dmid, rngs=rngs)
    self.linear2 = Linear(dmid, dout, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.gelu(self.dropout(self.bn(self.linear1(x))))
    return self.linear2(x)


class StackedMLP(nnx.Module):
  """``num_layers`` MLPs of width ``dim``, created with ``nnx.vmap``, applied with ``nnx.scan``.

  Every Variable of the stack has a leading layer axis; one compiled loop body
  serves all layers (scan over layers).
  """

  def __init__(self, dim: int, dmid: int, num_layers: int, *, rngs: nnx.Rngs):
    keys = jax.random.split(rngs.params(), num_layers)

    @nnx.vmap(in_axes=0, out_axes=0)
    def create_layer(key: jax.Array) -> MLP:
      return MLP(dim, dmid, dim, rngs=nnx.Rngs(key))

    self.layers = create_layer(keys)
    self.num_layers = num_layers

  def __call__(self, x: jax.Array) -> jax.Array:
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def forward(layer: MLP, x: jax.Array) -> jax.Array:
      return layer(x)

    return forward(self.layers, x)
