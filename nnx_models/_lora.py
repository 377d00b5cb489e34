"""LoRA model surgery: wrap Linears in LoraLinear anywhere in the object graph, and fold back."""

import jax
from flax import nnx
from flax.nnx import filterlib

from ._linear import Linear

# Both our guide-style Linear (w, b) and flax's nnx.Linear (kernel, bias) can be wrapped.
_LINEARS = (Linear, nnx.Linear)


class LoraParam(nnx.Param):
  """A LoRA adapter weight: a Param, so ``nnx.split(model, LoraParam, ...)`` separates it."""


def _weight(linear: Linear | nnx.Linear) -> nnx.Param:
  return linear.w if isinstance(linear, Linear) else linear.kernel


class LoraLinear(nnx.Module):
  """``linear(x) + x @ A @ B`` with low-rank adapters ``A`` and ``B``, as in the NNX guide.

  Both adapters are drawn from a normal distribution as in the guide, so the
  surgered model differs from the original until it is trained or merged.
  """

  def __init__(self, linear: Linear | nnx.Linear, rank: int, *, rngs: nnx.Rngs):
    din, dout = _weight(linear).shape
    self.linear = linear
    self.A = LoraParam(jax.random.normal(rngs.params(), (din, rank)))
    self.B = LoraParam(jax.random.normal(rngs.params(), (rank, dout)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear(x) + x @ self.A @ self.B


def lora(model: nnx.Module, rank: int, *, rngs: nnx.Rngs, where: filterlib.Filter = _LINEARS):
  """Returns ``model`` with every matching Linear replaced by a :class:`LoraLinear` wrapping it.

  The walk covers attributes, ``nnx.List``/``nnx.Dict`` containers and nested
  modules. A Linear reached from several parents becomes one LoraLinear shared by
  all of them. The result shares its base Variables with ``model``.

  Args:
    model: the module to operate on; it is not modified.
    rank: the adapters' inner dimension.
    rngs: draws the adapter weights.
    where: an NNX filter on ``(path, node)``, e.g. ``nnx.PathContains("linear1")``;
      only Linears that also match it are wrapped.

  Example:
    >>> from nnx_models import MLP
    >>> model = lora(MLP(2, 16, 5, rngs=nnx.Rngs(0)), 4, rngs=nnx.Rngs(1))
    >>> type(model.linear1).__name__, model.linear1.A.shape
    ('LoraLinear', (2, 4))
  """
  matches = filterlib.to_predicate(nnx.All(_LINEARS, where))

  def wrap(path, node):
    if matches(path, node):
      return LoraLinear(node, rank, rngs=rngs)
    return node

  return nnx.recursive_map(wrap, model)


def merge_lora(model: nnx.Module) -> nnx.Module:
  """Returns ``model`` with each LoraLinear folded into a plain Linear (``w + A @ B``).

  Sharing is kept: a LoraLinear used by two parents becomes one merged Linear.
  """

  def fold(path, node):
    if not isinstance(node, LoraLinear):
      return node
    merged = nnx.clone(node.linear)
    weight = _weight(merged)
    weight[...] = weight[...] + node.A[...] @ node.B[...]
    return merged

  return nnx.recursive_map(fold, model)
