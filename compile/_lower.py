"""Lowering: split an NNX model once into a pure ``fn(state, *args) -> (outputs, new_state)`` in StableHLO."""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from ._layout import Leaf, StateLayout
from ._stablehlo import OpSite, clean_for_iree


@dataclasses.dataclass(frozen=True)
class Lowered:
  """A model method lowered to StableHLO that iree-compile accepts.

  The compiled function takes ``(*state, *args)`` and returns ``(*outputs, *state)``,
  each flat, in the order of the fields below.

  Attributes:
    mlir: the StableHLO module text (sharding annotations removed).
    graphdef: the model's GraphDef, closed over by the function.
    model_name: the model's class name.
    method: the lowered method's name.
    state: the State's flat layout (names, Variable types, shapes, dtypes).
    args: the method's flat inputs.
    outputs: the method's flat outputs.
    output_treedef: the pytree structure of the method's return value.
    sites: every op of the program, with its source line, for target checks.
  """

  mlir: str
  graphdef: nnx.GraphDef
  model_name: str
  method: str
  state: StateLayout
  args: tuple[Leaf, ...]
  outputs: tuple[Leaf, ...]
  output_treedef: Any
  sites: tuple[OpSite, ...]

  def signature(self) -> str:
    """A readable signature, e.g. ``__call__(args[0]: float32[3, 2]) -> (outputs[0]: float32[3, 5])``."""
    args = ", ".join(leaf.describe() for leaf in self.args)
    outs = ", ".join(leaf.describe() for leaf in self.outputs)
    return f"{self.model_name}.{self.method}({args}) -> ({outs}) with {len(self.state.leaves)} state leaves"


def pure_function(graphdef: nnx.GraphDef, layout: StateLayout, method: str) -> Callable:
  """``fn(state_values, *args) -> (outputs, new_state_values)`` for one method of the model."""

  def pure(state_values, *args):
    model = nnx.merge(graphdef, layout.unflatten(state_values))
    outputs = getattr(model, method)(*args)
    return outputs, layout.flatten(nnx.state(model))

  return pure


def _leaves(prefix: str, tree: Any) -> tuple[Leaf, ...]:
  with_paths = jax.tree_util.tree_flatten_with_path(tree)[0]
  return tuple(
    Leaf(f"{prefix}{jax.tree_util.keystr(path)}", tuple(x.shape), np.dtype(x.dtype).name) for path, x in with_paths
  )


def lower(model: nnx.Module, /, *args: Any, method: str = "__call__") -> Lowered:
  """Lowers ``model.<method>(*args)`` with its state to StableHLO.

  The model is split once; its current mode (``model.train()`` / ``model.eval()``)
  is part of the GraphDef and so of the lowered program.

  Args:
    model: the NNX module.
    *args: example inputs (arrays or ``jax.ShapeDtypeStruct``), fixing shapes and dtypes.
    method: the method to lower.

  Returns:
    The :class:`Lowered` program.

  Example:
    >>> from nnx_models import MLP
    >>> lowered = lower(MLP(2, 16, 5, rngs=nnx.Rngs(0)), jax.ShapeDtypeStruct((3, 2), "float32"))
    >>> [leaf.shape for leaf in lowered.outputs]
    [(3, 5)]
  """
  graphdef, state = nnx.split(model)
  layout = StateLayout.of(state)
  pure = pure_function(graphdef, layout, method)
  # The IREE module is named jit_<this>; "main" is its function.
  pure.__name__ = f"{type(model).__name__}_{method.strip('_')}"
  shapes = jax.eval_shape(lambda *a: a, *args)
  traced = jax.jit(pure, keep_unused=True).lower(layout.flatten(state), *shapes)
  mlir, sites = clean_for_iree(traced.compiler_ir("stablehlo"))
  outputs, _ = traced.out_info
  return Lowered(
    mlir=mlir,
    graphdef=graphdef,
    model_name=type(model).__name__,
    method=method,
    state=layout,
    args=_leaves("args", list(shapes)),
    outputs=_leaves("outputs", outputs),
    output_treedef=jax.tree.structure(outputs),
    sites=sites,
  )
