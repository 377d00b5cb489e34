"""The zoo: every model nnx-metal builds, with the inputs it is lowered and tested with."""

import dataclasses
from collections.abc import Callable

import jax
from flax import nnx

from ._linear import Counter, Linear, StatefulLinear
from ._lora import lora
from ._mlp import MLP, StackedMLP
from ._regression import LinearRegression


@dataclasses.dataclass(frozen=True)
class ZooEntry:
  """One zoo model.

  Attributes:
    name: short name, also the build folder ``build/metal/<name>``.
    make: builds the model from an integer seed.
    example_args: builds example inputs for ``batch`` rows from a seed.
  """

  name: str
  make: Callable[[int], nnx.Module]
  example_args: Callable[[int, int], tuple[jax.Array, ...]]


def _normal(*feature_shape: int) -> Callable[[int, int], tuple[jax.Array, ...]]:
  def example_args(batch: int, seed: int) -> tuple[jax.Array, ...]:
    return (jax.random.normal(jax.random.key(seed), (batch, *feature_shape)),)

  return example_args


def _no_args(batch: int, seed: int) -> tuple[jax.Array, ...]:
  return ()


def _lora_mlp(seed: int) -> nnx.Module:
  return lora(MLP(2, 32, 5, rngs=nnx.Rngs(seed)), 4, rngs=nnx.Rngs(seed + 1))


ZOO: dict[str, ZooEntry] = {
  entry.name: entry
  for entry in [
    ZooEntry("linear", lambda s: Linear(2, 5, rngs=nnx.Rngs(params=s)), _normal(2)),
    ZooEntry("counter", lambda s: Counter(), _no_args),
    ZooEntry("stateful_linear", lambda s: StatefulLinear(3, 5, rngs=nnx.Rngs(s)), _normal(3)),
    ZooEntry("mlp", lambda s: MLP(2, 16, 5, rngs=nnx.Rngs(s)), _normal(2)),
    ZooEntry("lora_mlp", _lora_mlp, _normal(2)),
    ZooEntry("stacked_mlp", lambda s: StackedMLP(10, 32, 5, rngs=nnx.Rngs(s)), _normal(10)),
    ZooEntry("linear_regression", lambda s: LinearRegression(10, 5, rngs=nnx.Rngs(s)), _normal(10)),
  ]
}
