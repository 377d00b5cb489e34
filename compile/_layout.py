"""The flat layout of an NNX State at the compiled function's boundary.

The State is flattened once, in ``nnx.to_flat_state`` order, and that order is
the order of the compiled function's state arguments and results. Typed PRNG keys
(``key<fry>``) cannot cross into IREE, so they cross as their ``key_data``
(uint32) and are re-wrapped on the way back.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .runtime import PLAIN_ARRAY, StateMismatchError, path_name


@dataclasses.dataclass(frozen=True)
class Leaf:
  """One array crossing the compiled function's boundary.

  Attributes:
    name: ``linear1.w`` for state, ``args[0]`` for inputs, ``outputs[0]`` for results.
    shape: the shape as it crosses (a key's ``key_data`` shape for RNG keys).
    dtype: the numpy dtype name as it crosses.
    variable_type: the ``nnx.Variable`` subclass name (``Param``, ``Count``), state only.
    key_impl: the PRNG implementation of a typed key leaf, else None.
  """

  name: str
  shape: tuple[int, ...]
  dtype: str
  variable_type: str | None = None
  key_impl: str | None = None

  def describe(self) -> str:
    kind = f" ({self.variable_type})" if self.variable_type else ""
    return f"{self.name}{kind}: {self.dtype}{list(self.shape)}"


def _is_key(value: Any) -> bool:
  return jnp.issubdtype(getattr(value, "dtype", None), jax.dtypes.prng_key)


def value_of(leaf: Any) -> Any:
  """A state leaf's value: the Variable's, or the plain array itself."""
  return leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf


def variable_type_of(leaf: Any) -> str:
  return type(leaf).__name__ if isinstance(leaf, nnx.Variable) else PLAIN_ARRAY


def _leaf_of(path: tuple, variable: Any) -> Leaf:
  value = value_of(variable)
  impl = None
  if _is_key(value):
    impl = str(jax.random.key_impl(value))
    value = jax.eval_shape(jax.random.key_data, value)
  return Leaf(path_name(path), tuple(value.shape), np.dtype(value.dtype).name, variable_type_of(variable), impl)


@dataclasses.dataclass(frozen=True)
class StateLayout:
  """How one GraphDef's State maps to and from a flat list of arrays.

  Attributes:
    leaves: one Leaf per state Variable, in boundary order.
    treedef: the State's pytree structure, to rebuild it from flat values.
  """

  leaves: tuple[Leaf, ...]
  treedef: Any

  @classmethod
  def of(cls, state: nnx.State) -> "StateLayout":
    flat = nnx.to_flat_state(state)
    return cls(tuple(_leaf_of(p, v) for p, v in flat), jax.tree.structure(state))

  def values(self, state: nnx.State) -> list[Any]:
    """The State's values in boundary order, keys still typed. Works under tracing."""
    values, treedef = jax.tree.flatten(state)  # one walk of the pytree, also on the hot path
    if treedef != self.treedef:
      self.check(state)  # raises naming the first path that differs
    return values

  def keys_to_data(self, values: list[Any]) -> list[Any]:
    return [jax.random.key_data(v) if leaf.key_impl else v for leaf, v in zip(self.leaves, values, strict=True)]

  def data_to_keys(self, values: list[Any]) -> list[Any]:
    return [
      jax.random.wrap_key_data(v, impl=leaf.key_impl) if leaf.key_impl else v
      for leaf, v in zip(self.leaves, values, strict=True)
    ]

  def flatten(self, state: nnx.State) -> list[Any]:
    """The State's values in boundary order, keys as key_data. Works under tracing."""
    return self.keys_to_data(self.values(state))

  def unflatten(self, values: list[Any]) -> nnx.State:
    """The State holding ``values`` (boundary order); key_data is wrapped back into keys."""
    return jax.tree.unflatten(self.treedef, self.data_to_keys(values))

  def check(self, state: nnx.State) -> None:
    """Raises StateMismatchError naming the first path where ``state`` differs from this layout."""
    got = StateLayout.of(state).leaves
    expected = {leaf.name: leaf for leaf in self.leaves}
    for leaf in got:
      want = expected.pop(leaf.name, None)
      if want is None:
        raise StateMismatchError(
          f"State has {leaf.describe()}, which the compiled GraphDef does not have. "
          "Pass the State of the model that was lowered (nnx.split(model)), or lower again."
        )
      if (want.shape, want.dtype, want.variable_type) != (leaf.shape, leaf.dtype, leaf.variable_type):
        raise StateMismatchError(
          f"State leaf {leaf.name}: expected {want.describe()}, got {leaf.describe()}. "
          "Cast or reshape it, or lower the model again with the new state."
        )
    if expected:
      missing = next(iter(expected.values()))
      raise StateMismatchError(
        f"State is missing {missing.describe()}, which the compiled GraphDef needs. "
        "Pass the full State of the lowered model, not a filtered part of it."
      )
