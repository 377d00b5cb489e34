"""Programs: an artifact loaded on a device, its state resident there, its functions callable from Python.

The core imports only numpy and iree.runtime (the deployment path needs no JAX);
:meth:`Program.state`, :meth:`Program.load_state` and :meth:`Program.update`
speak ``nnx.State`` and import flax when called.
"""

import importlib
import pathlib
from collections.abc import Iterable
from typing import Any

import numpy as np

from ._artifact import GET_STATE, PARAMETER_SCOPE, SET_STATE, Artifact, params_index, path_name
from ._device import DeviceModule, open_device
from ._errors import ArtifactError, SignatureError, StateMismatchError, UnknownTargetError


def _describe(entry: dict[str, Any]) -> str:
  kind = f" ({entry['variable_type']})" if entry.get("variable_type") else ""
  return f"{entry['name']}{kind}: {entry['dtype']}{entry['shape']}"


# nnx_get_state and nnx_set_state take a flag the compiler cannot see is always 1 (see _assemble.py).
_FLAG = np.array(1, np.int32)


def flatten_inputs(tree: Any) -> list[Any]:
  """Flattens tuples, lists and dicts (sorted keys, as JAX does) into their leaves, without JAX."""
  if isinstance(tree, (tuple, list)):
    return [leaf for item in tree for leaf in flatten_inputs(item)]
  if isinstance(tree, dict):
    return [leaf for key in sorted(tree) for leaf in flatten_inputs(tree[key])]
  if tree is None:
    return []
  return [tree]


def unflatten_outputs(structure: dict[str, Any], leaves: list[np.ndarray]) -> Any:
  """Rebuilds a function's return value from its manifest ``structure`` (see ``_export.output_structure``)."""
  ((kind, content),) = structure.items()
  if kind == "leaf":
    return leaves[content]
  if kind == "none":
    return None
  if kind == "dict":
    return {key: unflatten_outputs(sub, leaves) for key, sub in content}
  items = [unflatten_outputs(sub, leaves) for sub in content]
  return items if kind == "list" else tuple(items)


class ProgramFunction:
  """One exported function of a :class:`Program`: host inputs in, host outputs out, state stays put."""

  def __init__(self, module: DeviceModule, name: str, spec: dict[str, Any]):
    self.name, self.spec, self._module = name, spec, module
    self._function = module.function(name)
    # Precomputed for the per-call checks: a call should cost little more than the raw invoke.
    self._inputs = [
      (tuple(leaf["shape"]), np.dtype(leaf["dtype"]), np.dtype(leaf["device_dtype"])) for leaf in spec["inputs"]
    ]
    self._outputs = [(np.dtype(leaf["device_dtype"]), np.dtype(leaf["dtype"])) for leaf in spec["outputs"]]

  def signature(self) -> str:
    inputs = ", ".join(_describe(leaf) for leaf in self.spec["inputs"])
    outputs = ", ".join(_describe(leaf) for leaf in self.spec["outputs"])
    return f"{self.name}({inputs}) -> ({outputs})"

  def device_inputs(self, args: tuple) -> list[np.ndarray]:
    """The inputs as arrays in device dtypes, checked against the signature."""
    # Plain arrays (the common case) skip the container walk.
    flat = list(args) if all(type(a) is np.ndarray for a in args) else flatten_inputs(args)
    if len(flat) != len(self._inputs):
      raise SignatureError(f"{self.name} takes {len(self._inputs)} input arrays, got {len(flat)}: {self.signature()}.")
    arrays = []
    for index, (value, (shape, dtype, device_dtype)) in enumerate(zip(flat, self._inputs, strict=True)):
      array = np.asarray(value)
      if array.shape != shape or array.dtype != dtype:
        leaf = self.spec["inputs"][index]
        raise SignatureError(
          f"{self.name} input {leaf['name']}: expected {leaf['dtype']}{leaf['shape']}, got "
          f"{array.dtype.name}{list(array.shape)}. The exported signature is {self.signature()}; "
          "pass matching inputs or export again with these shapes."
        )
      arrays.append(array if device_dtype == dtype else array.astype(device_dtype))
    return arrays

  def invoke(self, inputs: list) -> list:
    """Calls the function on device-dtype arrays (or device buffers); results stay on the device."""
    return self._module.invoke(self._function, inputs)

  def __call__(self, *args: Any) -> Any:
    views = self.invoke(self.device_inputs(args))
    leaves = [
      self._module.to_host(view, device_dtype).astype(dtype, copy=False)
      for view, (device_dtype, dtype) in zip(views, self._outputs, strict=True)
    ]
    return unflatten_outputs(self.spec["structure"], leaves)


class Program:
  """An exported program loaded on a device: state in device globals, one method per exported function.

  Example:
    >>> program = export(model, {"eval": method("__call__", x, mode="eval")}).load()
    >>> y = program.eval(x)                 # only x and y cross to the host
    >>> nnx.update(model, program.state())  # the device state, back in the eager model
  """

  def __init__(self, artifact: Artifact, *, device: str | None = None):
    target = artifact.manifest["target"]
    driver = device or target["drivers"][0]
    if driver not in target["drivers"]:
      raise UnknownTargetError(
        f"This artifact was compiled for {target['name']!r}, which runs on the IREE driver(s) "
        f"{', '.join(target['drivers'])}, not {driver!r}. Export for another target to run there."
      )
    self.artifact, self.driver = artifact, driver
    parameters = {PARAMETER_SCOPE: params_index(artifact.params)}
    self._module = DeviceModule(artifact.vmfb, open_device(driver), parameters=parameters)
    self.functions = {name: ProgramFunction(self._module, name, spec) for name, spec in artifact.functions.items()}
    for name, program_function in self.functions.items():
      if not hasattr(type(self), name):  # a function named like a method stays reachable as program.functions[name]
        setattr(self, name, program_function)
    self._entries = {entry["name"]: entry for entry in artifact.state}
    self._get_state = self._module.function(GET_STATE)
    self._set_state = self._module.function(SET_STATE)

  def __getattr__(self, name: str) -> ProgramFunction:
    functions = self.__dict__.get("functions", {})
    if name in functions:
      return functions[name]
    raise AttributeError(f"This program has no function {name!r}; it has {', '.join(functions) or 'none'}.")

  def __dir__(self) -> Iterable[str]:
    return [*super().__dir__(), *self.functions]

  # State as numpy arrays, by variable name (the NNX path joined with dots). No JAX needed.

  def _device_views(self) -> list:
    return self._module.invoke(self._get_state, [_FLAG])

  def _device_arrays(self, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    views = self._device_views()
    selected = set(self._entries) if names is None else set(names)
    return {
      entry["name"]: self._module.to_host(view, np.dtype(entry["device_dtype"]))
      for entry, view in zip(self.artifact.state, views, strict=True)
      if entry["name"] in selected
    }

  def arrays(self, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Copies state variables from the device: ``{name: array}`` (all, or those in ``names``)."""
    names = None if names is None else list(names)  # read twice below; a generator would be empty the second time
    unknown = set(names or ()) - set(self._entries)
    if unknown:
      raise self._unknown(sorted(unknown)[0])
    device = self._device_arrays(names)
    return {name: array.astype(self._entries[name]["dtype"], copy=False) for name, array in device.items()}

  def set_arrays(self, arrays: dict[str, Any]) -> None:
    """Replaces the state variables named in ``arrays`` on the device; the others are kept.

    Raises:
      StateMismatchError: a name the program does not have, or a wrong shape or dtype (names the variable).
    """
    replacements = {}
    for name, value in arrays.items():
      entry = self._entries.get(name)
      if entry is None:
        raise self._unknown(name)
      array = np.asarray(value)
      if array.shape != tuple(entry["shape"]) or array.dtype.name != entry["dtype"]:
        raise StateMismatchError(
          f"State variable {_describe(entry)} cannot take a {array.dtype.name}{list(array.shape)} value. "
          "Push state of the model that was exported, or export again with the new shapes."
        )
      replacements[name] = array.astype(entry["device_dtype"], copy=False)
    views = self._device_views()
    values = [replacements.get(entry["name"], view) for entry, view in zip(self.artifact.state, views, strict=True)]
    self._module.invoke(self._set_state, [_FLAG, *values])

  def _unknown(self, name: str) -> StateMismatchError:
    known = ", ".join(list(self._entries)[:6])
    return StateMismatchError(
      f"This program has no state variable {name!r} (it has {known}{', ...' if len(self._entries) > 6 else ''}). "
      "Paths of a program exported from a dict of objects start with its keys, e.g. {'model': model}."
    )

  # State as nnx.State (needs flax).

  def state(self, filter: Any = ...) -> Any:
    """Copies the state from the device as an ``nnx.State``, optionally only what ``filter`` selects.

    ``nnx.update(objects, program.state())`` merges it into the eager objects.
    """
    import jax
    from flax import nnx

    predicate = nnx.filterlib.to_predicate(filter)
    selected = [
      entry
      for entry in self.artifact.state
      if predicate(tuple(entry["path"]), _variable_class(entry)(jax.ShapeDtypeStruct(entry["shape"], entry["dtype"])))
    ]
    return nnx_state(selected, self.arrays([entry["name"] for entry in selected]))

  def load_state(self, source: Any, filter: Any = ...) -> None:
    """Pushes ``source`` (an ``nnx.State``, a module, or a dict of objects) to the device.

    Only the variables ``filter`` selects are pushed, e.g. ``load_state(model, LoraParam)``
    swaps adapter weights without recompiling.

    Raises:
      StateMismatchError: a path the program does not have, another Variable type,
        or a wrong shape or dtype; the message names the path.
    """
    import jax
    from flax import nnx

    state = source if isinstance(source, nnx.State) else nnx.state(source)
    if filter is not ...:
      state = nnx.filter_state(state, filter)
    arrays = {}
    for path, variable in nnx.to_flat_state(state):
      name = path_name(path)
      entry = self._entries.get(name)
      if entry is None:
        raise self._unknown(name)
      if type(variable).__name__ != entry["variable_type"]:
        raise StateMismatchError(
          f"State variable {name} is a {type(variable).__name__}; the program holds a {entry['variable_type']} there."
        )
      value = variable.get_value()
      arrays[name] = jax.random.key_data(value) if entry["key_impl"] else value
    self.set_arrays(arrays)

  def update(self, objects: Any, filter: Any = ...) -> None:
    """``nnx.update(objects, self.state(filter))``: the device state merged into the eager objects."""
    from flax import nnx

    nnx.update(objects, self.state(filter))

  def save(self, directory: str | pathlib.Path) -> Artifact:
    """Writes this program with its current device state as an artifact directory (atomically)."""
    artifact = self.artifact.with_params(
      {self._entries[name]["global"]: array for name, array in self._device_arrays().items()}
    )
    artifact.save(directory)
    return artifact


def nnx_state(entries: list[dict[str, Any]], arrays: dict[str, np.ndarray]) -> Any:
  """The ``nnx.State`` of the manifest ``entries`` holding ``arrays`` (by variable name); needs flax."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  flat = []
  for entry in entries:
    value = jnp.asarray(arrays[entry["name"]])
    if entry["key_impl"]:
      value = jax.random.wrap_key_data(value, impl=entry["key_impl"])
    flat.append((tuple(entry["path"]), _variable_class(entry)(value, **entry["metadata"])))
  return nnx.from_flat_state(flat)


def _variable_class(entry: dict[str, Any]) -> type:
  module_name, _, qualname = entry["variable_class"].partition(":")
  try:
    cls = importlib.import_module(module_name)
    for part in qualname.split("."):
      cls = getattr(cls, part)
  except (ImportError, AttributeError) as e:
    raise ArtifactError(
      f"State variable {entry['name']} is a {entry['variable_class']}, which cannot be imported here ({e}). "
      "Install the package that defines the model to get nnx.State, or use Program.arrays()."
    ) from None
  return cls


def load_program(directory: str | pathlib.Path, *, device: str | None = None) -> Program:
  """Opens, verifies and loads an artifact directory (see :meth:`Artifact.open`)."""
  return Artifact.open(directory).load(device=device)
