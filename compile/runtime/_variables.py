"""Which ``nnx.Variable`` class a state entry of an artifact is: looked up among known classes, never imported.

A manifest names each variable's class (``nnx_models._lora:LoraParam``) to describe
it. Rebuilding an ``nnx.State`` needs the class itself: it is looked up among
flax.nnx's own Variable types and those registered with :func:`register_variable_type`.
``compile.export`` registers the classes of the objects it exports, and
``nnx_models`` registers its own; in a fresh process, register yours before
loading an artifact that holds them. Imports flax only when called.
"""

from collections.abc import Iterable
from typing import Any

import numpy as np

from . import _dtypes
from ._errors import ArtifactError
from ._records import Variable

_REGISTERED: dict[str, type] = {}
PLAIN_ARRAY = "Array"  # the variable type of a plain array in the State


def class_path(cls: type) -> str:
  """``module:qualname`` of a class, as manifests record it."""
  return f"{cls.__module__}:{cls.__qualname__}"


def register_variable_type(cls: type) -> type:
  """Lets artifacts holding ``cls`` (an ``nnx.Variable`` subclass) rebuild it; returns ``cls`` (a decorator).

  Example:
    >>> @register_variable_type
    ... class Count(nnx.Variable):
    ...   pass
  """
  from flax import nnx

  if not (isinstance(cls, type) and issubclass(cls, nnx.Variable)):
    raise TypeError(f"register_variable_type takes an nnx.Variable subclass, not {cls!r}.")
  _REGISTERED[class_path(cls)] = cls
  return cls


def _flax_types() -> dict[str, type]:
  """flax's own Variable classes: nnx's, and those of its submodules (nnx.metrics' MetricState, optimizer state)."""
  from flax import nnx

  found, pending = {}, [nnx.Variable]
  while pending:
    cls = pending.pop()
    if cls.__module__.split(".")[0] == "flax":
      found[class_path(cls)] = cls
    pending += cls.__subclasses__()
  return found


# Metadata flax itself interprets (sharding, hooks, how the value is held): never taken from a file.
_FLAX_METADATA = frozenset({"value", "raw_value", "hijax", "ref", "eager_sharding", "mutable", "type", "metadata"})
_FLAX_METADATA |= frozenset({"sharding", "sharding_names", "out_sharding", "mesh", "sharding_rules"})


def user_metadata(metadata: dict) -> dict:
  """The metadata a Variable carries for its user (JSON scalars, plain names), not flax's own settings."""
  return {
    key: value
    for key, value in metadata.items()
    if key not in _FLAX_METADATA and not key.startswith(("on_", "_")) and isinstance(value, str | int | float | bool)
  }


def rebuild(variable: Variable, value: Any) -> Any:
  """The Variable (or plain array) ``variable`` describes, holding ``value``, with its user metadata.

  Raises:
    ArtifactError: its class is not known here, or refuses that metadata.
  """
  cls = resolve(variable)
  if cls is None:
    return value
  try:
    return cls(value, **user_metadata(variable.metadata))
  except Exception as e:  # noqa: BLE001 - a class of the user's: whatever its constructor raises
    raise ArtifactError(f"State variable {variable.name}: {cls.__name__} refuses its metadata ({e}).") from None


def known_variable_class(path: str) -> type | None:
  """The Variable class ``path`` (``module:qualname``) names, if flax has it or it was registered; else None."""
  return _REGISTERED.get(path) or _flax_types().get(path)


def resolve(variable: Variable) -> type | None:
  """The class of ``variable``; None for a plain array of the State (an attribute marked ``nnx.data``).

  Raises:
    ArtifactError: the class is neither flax's nor registered.
  """
  if variable.variable_class == "" and variable.variable_type == PLAIN_ARRAY:
    return None
  cls = _REGISTERED.get(variable.variable_class) or _flax_types().get(variable.variable_class)
  if cls is None or cls.__name__ != variable.variable_type:
    raise ArtifactError(
      f"State variable {variable.name} is a {variable.variable_class}, which is not a registered Variable type. "
      f"Import it and call compile.register_variable_type({variable.variable_type}) before loading the "
      "state (artifacts never import code), or read plain arrays with Program.arrays()."
    )
  return cls


def nnx_state(variables: Iterable[Variable], arrays: dict[str, np.ndarray]) -> Any:
  """The ``nnx.State`` of ``variables`` holding ``arrays`` (by variable name); needs flax."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  flat = []
  for variable in variables:
    value = jnp.asarray(np.asarray(arrays[variable.name]).astype(_dtypes.dtype(variable.dtype).numpy, copy=False))
    if variable.key_impl:
      value = jax.random.wrap_key_data(value, impl=variable.key_impl)
    flat.append((variable.path, rebuild(variable, value)))
  return nnx.from_flat_state(flat)


def placeholder(variable: Variable) -> Any:
  """What an NNX filter sees of ``variable``: its Variable type holding a shape, or the plain array's shape."""
  import jax

  shape = jax.ShapeDtypeStruct(variable.shape, variable.dtype)
  cls = resolve(variable)
  return shape if cls is None else cls(shape)
