"""Programs: an artifact loaded on a device, its state resident there, its functions callable from Python.

The core needs only numpy and iree.runtime; :meth:`Program.state`,
:meth:`Program.load_state`, :meth:`Program.update` and :meth:`Program.functional`
speak ``nnx.State`` and import flax when called. A Program may be called from many
threads: calls are serialized, because every call reads and writes the same device globals.
"""

import os
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _buckets, _dims, _dtypes, _inputs, _variables
from ._device import DeviceModule, load_module
from ._errors import SignatureError, StateMismatchError, UnknownTargetError
from ._interface import GET_STATE, PARAMETER_SCOPE, SET_STATE, path_name
from ._params import params_index
from ._pytrees import unflatten_outputs
from ._records import Function, Tensor, Variable

if TYPE_CHECKING:  # Artifact.load makes Programs; a Program only reads its artifact
  from ._artifact import Artifact

# nnx_get_state and nnx_set_state take a flag the compiler cannot see is always 1 (see compile/_assemble.py).
_FLAG = np.array(1, np.int32)


# How deep containers of inputs may nest (a list that holds itself is infinitely deep).
MAX_INPUT_DEPTH = 64


def flatten_inputs(tree: Any, depth: int = 0) -> list[Any]:
  """Flattens tuples, lists and dicts (sorted keys, as JAX does) into their leaves, without JAX."""
  if depth > MAX_INPUT_DEPTH:
    raise SignatureError(f"The inputs nest containers more than {MAX_INPUT_DEPTH} deep (or a list holds itself).")
  if isinstance(tree, tuple | list):
    return [leaf for item in tree for leaf in flatten_inputs(item, depth + 1)]
  if isinstance(tree, dict):
    try:
      keys = sorted(tree)
    except TypeError:
      raise SignatureError(
        f"A dict of inputs needs keys of one sortable type (JAX sorts them), got {list(tree)[:4]}."
      ) from None
    return [leaf for key in keys for leaf in flatten_inputs(tree[key], depth + 1)]
  if tree is None:
    return []
  return [tree]


def host_array(value: Any, tensor: Tensor, what: str) -> np.ndarray:
  """``value`` as ``tensor``'s device dtype, after checking its shape and dtype (any byte order)."""
  array = _dtypes.as_array(value, f"{what} {tensor.name}", SignatureError)
  if array.shape != tensor.shape or array.dtype.name != tensor.dtype:
    raise SignatureError(
      f"{what} {tensor.name}: expected {tensor.dtype}{list(tensor.shape)}, got {array.dtype.name}{list(array.shape)}."
    )
  return array.astype(_dtypes.dtype(tensor.device_dtype).numpy, copy=False)


class ProgramFunction:
  """One exported function of a :class:`Program`: host inputs in, host outputs out, state stays put."""

  def __init__(self, program: "Program", spec: Function):
    self.name, self.spec, self._program = spec.name, spec, program
    self.bind(program._module)
    self._tree = _inputs.input_tree(spec.inputs)
    self._flat = self._tree is not None and all(type(node) is int for node in self._tree.values())

  def signature(self) -> str:
    return self.spec.signature()

  def bind(self, module: DeviceModule) -> None:
    """Calls this function of ``module`` from now on (the Program loaded its module again)."""
    self._function = module.function(self.name)

  def flat_inputs(self, args: tuple) -> list[Any]:
    """What the user passed, matched to the exported inputs' structure: one value per input (see ``_inputs.py``)."""
    tensors = self.spec.inputs
    if len(args) == len(tensors) and self._flat and all(type(a) is np.ndarray for a in args):
      return list(args)  # the hot path: one array per input, as exported
    if self._tree is None:  # names that are no paths (an artifact edited by hand): match flat
      flat = flatten_inputs(args)
      if len(flat) != len(tensors):
        raise SignatureError(f"{self.name} takes {len(tensors)} input arrays, got {len(flat)}: {self.signature()}.")
      return flat
    if len(args) != len(self._tree):
      what = "input arrays" if self._flat else "inputs"
      raise SignatureError(
        f"{self.name} takes {len(self._tree)} {what}, got {len(args)}: {_inputs.describe(self._tree, tensors)}."
      )
    flat = [None] * len(tensors)
    for i, value in enumerate(args):
      _inputs.match(self._tree[i], value, f"{self.name} input args[{i}]", tensors, flat)
    return flat

  def device_inputs(self, args: tuple, sizes: dict[str, int] | None = None) -> list[np.ndarray]:
    """The inputs as arrays in device dtypes, checked against the signature.

    ``sizes`` receives the sizes of the symbolic dimensions (``_dims.py``) the inputs have.
    """
    return self._device_arrays(self.flat_inputs(args), {} if sizes is None else sizes)

  def _device_arrays(self, flat: list[Any], sizes: dict[str, int]) -> list[np.ndarray]:
    tensors = self.spec.inputs
    try:
      arrays = [_inputs.leaf_array(v, t, f"{self.name} input", sizes) for v, t in zip(flat, tensors, strict=True)]
    except SignatureError as e:
      raise SignatureError(f"{e} The exported signature is {self.signature()}; pass matching inputs.") from None
    return [a.astype(_dtypes.dtype(t.device_dtype).numpy, copy=False) for a, t in zip(arrays, tensors, strict=True)]

  def run_flat(self, flat: list[Any]) -> list[np.ndarray]:
    """Runs on one value per input (see :meth:`flat_inputs`); the flat outputs."""
    sizes: dict[str, int] = {}
    inputs = self._device_arrays(flat, sizes)
    shapes = [_dims.concrete(tensor.shape, sizes) for tensor in self.spec.outputs]
    with self._program._lock:
      views = self._program._module.invoke(self._function, inputs)
      pairs = zip(views, self.spec.outputs, shapes, strict=True)
      return [self._program._host(view, tensor, shape) for view, tensor, shape in pairs]

  def __call__(self, *args: Any) -> Any:
    leaves = self.run_flat(self.flat_inputs(args))
    return unflatten_outputs(self.spec.structure, leaves, _variables.known_variable_class)


class Program:
  """An exported program loaded on a device: state in device globals, one callable per exported function.

  Example:
    >>> program = export(model, {"eval": method("__call__", x, mode="eval")}).load()
    >>> y = program.eval(x)                 # only x and y cross to the host
    >>> nnx.update(model, program.state())  # the device state, back in the eager model
  """

  def __init__(self, artifact: "Artifact", *, device: str | None = None):
    target = artifact.manifest.target
    driver = device or target.default_driver(f.flops for f in artifact.manifest.functions.values())
    if driver not in target.drivers:
      raise UnknownTargetError(
        f"This artifact was compiled for {target.name!r}, which runs on the IREE driver(s) "
        f"{', '.join(target.drivers)}, not {driver!r}. Export for another target to run there."
      )
    self.artifact, self.driver = artifact, driver
    self._lock = threading.RLock()
    self._module = load_module(
      artifact.vmfb,
      driver,
      subgroup_size=target.subgroup_size,
      parameters={PARAMETER_SCOPE: params_index(artifact.params)},
    )
    self.functions = {name: ProgramFunction(self, spec) for name, spec in artifact.functions.items()}
    self._groups = _buckets.groups(self.functions)  # functions exported with buckets=, by name
    self._variables = {v.name: v for v in artifact.state}
    self._written = {v.name for v in artifact.manifest.written()}  # the rest is constant on the device
    self._get_state = self._module.function(GET_STATE)
    self._set_state = self._module.function(SET_STATE)

  def __getattr__(self, name: str) -> "ProgramFunction | _buckets.Bucketed":
    functions, groups = self.__dict__.get("functions", {}), self.__dict__.get("_groups", {})
    if name in functions:
      return functions[name]
    if name in groups:
      return groups[name]
    raise AttributeError(f"This program has no function {name!r}; it has {', '.join(functions) or 'none'}.")

  def __dir__(self) -> Iterable[str]:
    return [*super().__dir__(), *self.functions, *self._groups]

  def _host(self, view, tensor: Tensor, shape: tuple[int, ...]) -> np.ndarray:
    array = self._module.to_host(view, shape, tensor.device_dtype)
    return array.astype(_dtypes.dtype(tensor.dtype).numpy, copy=False)

  # State as numpy arrays, by variable name (the NNX path joined with dots). No JAX needed.

  def _device_arrays(self, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    selected = set(self._variables) if names is None else set(names)
    with self._lock:
      views = self._module.invoke(self._get_state, [_FLAG])
      return {
        v.name: self._module.to_host(view, v.shape, v.device_dtype)
        for v, view in zip(self.artifact.state, views, strict=True)
        if v.name in selected
      }

  def arrays(self, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Copies state variables from the device: ``{name: array}`` (all, or those in ``names``)."""
    if isinstance(names, str) or not (names is None or isinstance(names, Iterable)):
      raise StateMismatchError(f"arrays() takes a list of state variable names, not {type(names).__name__}.")
    names = None if names is None else list(names)  # read twice below; a generator would be empty the second time
    for name in names or ():
      self._variable(name)
    device = self._device_arrays(names)
    return {name: a.astype(_dtypes.dtype(self._variables[name].dtype).numpy, copy=False) for name, a in device.items()}

  def set_arrays(self, arrays: dict[str, Any]) -> None:
    """Replaces the state variables named in ``arrays`` on the device; the others are kept. All or nothing.

    Raises:
      StateMismatchError: a name the program does not have, or a wrong shape or dtype (names the variable).
    """
    if not isinstance(arrays, Mapping):
      raise StateMismatchError(f"set_arrays() takes a dict {{name: array}}, not {type(arrays).__name__}.")
    replacements = {}
    for name, value in arrays.items():
      variable = self._variable(name)
      try:
        replacements[name] = host_array(value, variable, "State variable")
      except SignatureError as e:
        raise StateMismatchError(f"{e} Push state of the model that was exported, or export again.") from None
    with self._lock:
      views = self._module.invoke(self._get_state, [_FLAG])
      current = dict(zip((v.name for v in self.artifact.state), views, strict=True))
      if any(self._changes_constant(name, value, current[name]) for name, value in replacements.items()):
        self._reload({**current, **replacements})
        return
      written = [replacements.get(v.name, current[v.name]) for v in self.artifact.state if v.name in self._written]
      self._module.invoke(self._set_state, [_FLAG, *written])

  def _changes_constant(self, name: str, value: np.ndarray, view) -> bool:
    if name in self._written:
      return False
    variable = self._variables[name]
    return value.tobytes() != self._module.to_host(view, variable.shape, variable.device_dtype).tobytes()

  def _reload(self, values: dict[str, Any]) -> None:
    """Loads the module again, its globals initialized from ``values`` (device buffers or arrays, by name).

    A variable no function writes is an immutable global (compile/_assemble.py): it cannot
    be stored, so replacing it means loading the module again, where IREE also re-derives
    what it computed from it at load. Nothing changes if loading fails.
    """
    params = {}
    for v in self.artifact.state:
      value = values[v.name]
      host = value if isinstance(value, np.ndarray) else self._module.to_host(value, v.shape, v.device_dtype)
      params[v.global_name] = host.astype(_dtypes.dtype(v.dtype).numpy, copy=False)  # as save() writes them
    module = DeviceModule(self.artifact.vmfb, self._module.device, parameters={PARAMETER_SCOPE: params_index(params)})
    self._module = module
    self._get_state, self._set_state = module.function(GET_STATE), module.function(SET_STATE)
    for function in self.functions.values():
      function.bind(module)

  def _variable(self, name: str) -> Variable:
    variable = self._variables.get(name) if isinstance(name, str) else None
    if variable is None:
      known = ", ".join(list(self._variables)[:6])
      raise StateMismatchError(
        f"This program has no state variable {name!r} (it has {known}{', ...' if len(self._variables) > 6 else ''}). "
        "Paths of a program exported from a dict of objects start with its keys, e.g. {'model': model}."
      )
    return variable

  # State as nnx.State (needs flax).

  def state(self, filter: Any = ...) -> Any:
    """Copies the state from the device as an ``nnx.State``, optionally only what ``filter`` selects.

    ``nnx.update(objects, program.state())`` merges it into the eager objects.
    """
    predicate = _predicate(filter)
    selected = [v for v in self.artifact.state if predicate(v.path, _variables.placeholder(v))]
    return _variables.nnx_state(selected, self.arrays([v.name for v in selected]))

  def load_state(self, source: Any, filter: Any = ..., *, complete: bool = False) -> None:
    """Pushes ``source`` (an ``nnx.State``, a module, or a dict of objects) to the device. All or nothing.

    Only the variables ``filter`` selects are pushed, e.g. ``load_state(model, LoraParam)``
    swaps adapter weights without recompiling.

    Args:
      source: where the values come from.
      filter: an NNX filter selecting what to push.
      complete: require every state variable of the program to be pushed.

    Raises:
      StateMismatchError: a path the program does not have, another Variable type,
        a wrong shape or dtype, or (``complete``) a missing variable; the message names the path.
    """
    from flax import nnx

    if not (isinstance(source, nnx.State | dict | list | tuple) or nnx.graph.is_graph_node(source)):
      raise StateMismatchError(
        f"load_state() takes an nnx.State, a module or a dict of objects, not {type(source).__name__}."
      )
    try:
      state = source if isinstance(source, nnx.State) else nnx.state(source)
    except Exception as e:  # noqa: BLE001 - flax on a container of the user's that holds no graph
      raise StateMismatchError(f"load_state() cannot take the state of this {type(source).__name__}: {e}") from None
    if filter is not ...:
      _predicate(filter)
      state = nnx.filter_state(state, filter)
    arrays = {}
    for path, variable in nnx.to_flat_state(state):
      name = path_name(path)
      expected = self._variable(name)
      got_type = type(variable).__name__ if isinstance(variable, nnx.Variable) else _variables.PLAIN_ARRAY
      if got_type != expected.variable_type:
        raise StateMismatchError(
          f"State variable {name} is a {got_type}; the program holds a {expected.variable_type} there."
        )
      value = variable.get_value() if isinstance(variable, nnx.Variable) else variable
      arrays[name] = value  # a typed PRNG key becomes its key data in set_arrays
    missing = [name for name in self._variables if name not in arrays]
    if complete and missing:
      raise StateMismatchError(
        f"The state lacks {self._variables[missing[0]].describe()}{' and more' if len(missing) > 1 else ''}; "
        "pass the full State of the exported objects (nnx.state(objects))."
      )
    self.set_arrays(arrays)

  def update(self, objects: Any, filter: Any = ...) -> None:
    """``nnx.update(objects, self.state(filter))``: the device state merged into the eager objects."""
    from flax import nnx

    nnx.update(objects, self.state(filter))

  def functional(self, name: str) -> Callable[..., tuple[Any, Any]]:
    """Function ``name`` as a pure function of the state: ``outputs, new_state = f(state, *args)``.

    ``state`` is the full ``nnx.State`` of the exported objects (``nnx.state(objects)``);
    it is pushed to the device, the function runs, and the whole state comes back.
    Handy for stepping through the compiled program from eager code; a plain
    ``program.<name>(...)`` keeps the state on the device instead.
    """
    function = (self.functions.get(name) or self._groups.get(name)) if isinstance(name, str) else None
    if function is None:
      names = [*self.functions, *self._groups]
      raise SignatureError(f"This program has no function {name!r}; it has {', '.join(names) or 'none'}.")

    def call(state: Any, *args: Any) -> tuple[Any, Any]:
      with self._lock:
        self.load_state(state, complete=True)
        outputs = function(*args)
        return outputs, self.state()

    call.__name__ = name
    return call

  def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> "Artifact":
    """Writes this program with its current device state as an artifact directory (see :meth:`Artifact.save`)."""
    params = {self._variables[name].global_name: array for name, array in self.arrays().items()}
    return self.artifact.with_params(params).save(directory, overwrite=overwrite)


def _predicate(filter: Any) -> Callable:
  """The predicate of an NNX filter; StateMismatchError for what is not a filter (123)."""
  from flax import nnx

  try:
    return nnx.filterlib.to_predicate(filter)
  except (TypeError, ValueError) as e:
    raise StateMismatchError(
      f"{filter!r:.80} is not an NNX filter; pass a Variable type, a path or ... ({e})"
    ) from None
