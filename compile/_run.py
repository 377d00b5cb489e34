"""Running: a Compiled module loaded on a runtime device, called with a State and inputs."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ._build import Compiled
from ._device import DeviceModule, open_device
from ._errors import SignatureError, StateMismatchError, UnknownTargetError
from ._layout import Leaf
from ._targets import Target

# What a dtype becomes on a target that demotes f64 (see _targets.py).
_DEMOTED = {"float64": "float32"}


def device_dtype(dtype: str, target: Target) -> np.dtype:
  """The dtype an array of ``dtype`` has on ``target``'s device."""
  return np.dtype(_DEMOTED.get(dtype, dtype) if target.demote_f64 else dtype)


class Executable:
  """A compiled model method loaded on one runtime device.

  Calls are functional: ``outputs, new_state = executable(state, *args)``; merge
  ``new_state`` into the eager model with ``nnx.update``. Use :meth:`bind` to keep
  the state on the device between calls instead.

  Example:
    >>> executable = load(build(lower(model, x), "cpu"))
    >>> y, new_state = executable(nnx.state(model), x)
    >>> nnx.update(model, new_state)
  """

  def __init__(self, compiled: Compiled, *, device: str | None = None):
    target = compiled.target
    driver = device or target.drivers[0]
    if driver not in target.drivers:
      raise UnknownTargetError(
        f"A module compiled for {target.name!r} runs on the IREE driver(s) "
        f"{', '.join(target.drivers)}, not {driver!r}. Build for another target to run there."
      )
    self.compiled, self.lowered, self.driver = compiled, compiled.lowered, driver
    self._module = DeviceModule(compiled.vmfb, open_device(driver))
    self._function = self._module.function("main")
    state_leaves = self.lowered.state.leaves
    self._state_dtypes = [device_dtype(leaf.dtype, target) for leaf in state_leaves]
    self._arg_dtypes = [device_dtype(leaf.dtype, target) for leaf in self.lowered.args]
    self._output_dtypes = [device_dtype(leaf.dtype, target) for leaf in self.lowered.outputs]

  def __call__(self, state: nnx.State, *args: Any) -> tuple[Any, nnx.State]:
    """Runs the method on ``state`` and ``args``; returns ``(outputs, new_state)``.

    Raises:
      StateMismatchError: ``state`` does not match the lowered GraphDef (names the path).
      SignatureError: an input has the wrong shape or dtype (names the argument).
    """
    outputs, state_views = self.run([*self.state_arrays(state), *self.arg_arrays(args)])
    return outputs, self.state_from(state_views)

  def bind(self, state: nnx.State) -> "Session":
    """A :class:`Session` that keeps ``state`` on the device across calls."""
    return Session(self, state)

  # The boundary: host values in, device results out, both checked against the signature.

  def state_arrays(self, state: nnx.State) -> list[np.ndarray]:
    layout = self.lowered.state
    values = layout.flatten(state)
    return [
      _checked(leaf, v, dt, _state_mismatch)
      for leaf, v, dt in zip(layout.leaves, values, self._state_dtypes, strict=True)
    ]

  def arg_arrays(self, args: tuple) -> list[np.ndarray]:
    flat = jax.tree.leaves(args)
    if len(flat) != len(self.lowered.args):
      raise SignatureError(
        f"Got {len(flat)} input arrays, expected {len(self.lowered.args)}: {self.lowered.signature()}."
      )
    return [
      _checked(leaf, v, dt, self._arg_mismatch)
      for leaf, v, dt in zip(self.lowered.args, flat, self._arg_dtypes, strict=True)
    ]

  def outputs_from(self, views: list) -> Any:
    arrays = [
      self._host(leaf, v, dt) for leaf, v, dt in zip(self.lowered.outputs, views, self._output_dtypes, strict=True)
    ]
    return jax.tree.unflatten(self.lowered.output_treedef, arrays)

  def state_from(self, views: list) -> nnx.State:
    layout = self.lowered.state
    values = [self._host(leaf, v, dt) for leaf, v, dt in zip(layout.leaves, views, self._state_dtypes, strict=True)]
    return layout.unflatten(values)

  def to_device(self, arrays: list[np.ndarray]) -> list:
    return [self._module.to_device(a) for a in arrays]

  def run(self, inputs: list) -> tuple[Any, list]:
    """Invokes the module on ``(*state, *args)``; returns host outputs and the new state.

    The new state is ``inputs``' state with the leaves the function changed
    replaced by its results, which stay on the device until read.
    """
    results = self._module.invoke(self._function, inputs)
    num_outputs = len(self.lowered.outputs)
    new_state = inputs[: len(self.lowered.state.leaves)]
    for index, view in zip(self.lowered.updates, results[num_outputs:], strict=True):
      new_state[index] = view
    return self.outputs_from(results[:num_outputs]), new_state

  def _host(self, leaf: Leaf, value, dtype: np.dtype) -> jax.Array:
    if not isinstance(value, np.ndarray):  # a device buffer view
      value = self._module.to_host(value, dtype)
    return jnp.asarray(value.astype(leaf.dtype, copy=False))

  def _arg_mismatch(self, leaf: Leaf, got: str) -> SignatureError:
    return SignatureError(
      f"Input {leaf.name}: expected {leaf.dtype}{list(leaf.shape)}, got {got}. "
      f"The compiled signature is {self.lowered.signature()}; "
      "pass matching inputs or lower again with these shapes."
    )


def _state_mismatch(leaf: Leaf, got: str) -> StateMismatchError:
  return StateMismatchError(
    f"State leaf {leaf.name} ({leaf.variable_type}): expected {leaf.dtype}{list(leaf.shape)}, "
    f"got {got}. Pass the State of the lowered model or lower again."
  )


def _checked(leaf: Leaf, value: Any, dtype: np.dtype, mismatch) -> np.ndarray:
  array = np.asarray(value)
  if array.shape != leaf.shape or array.dtype.name != leaf.dtype:
    raise mismatch(leaf, f"{array.dtype.name}{list(array.shape)}")
  return array.astype(dtype, copy=False)


class Session:
  """An :class:`Executable` with its state resident on the device.

  Only the method's inputs and outputs cross to the host on each call; the state
  comes back only when asked for with :meth:`state`.
  """

  def __init__(self, executable: Executable, state: nnx.State):
    self.executable = executable
    self._state = executable.to_device(executable.state_arrays(state))

  def __call__(self, *args: Any) -> Any:
    outputs, self._state = self.executable.run([*self._state, *self.executable.arg_arrays(args)])
    return outputs

  def state(self) -> nnx.State:
    """Copies the current state from the device as an ``nnx.State``."""
    return self.executable.state_from(self._state)

  def update(self, model: nnx.Module) -> None:
    """Merges the device state into the eager ``model`` (``nnx.update``)."""
    nnx.update(model, self.state())


def load(compiled: Compiled, *, device: str | None = None) -> Executable:
  """Loads ``compiled`` on ``device`` (an IREE driver name; default: the target's first)."""
  return Executable(compiled, device=device)
