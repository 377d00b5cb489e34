"""Calls an IREE module on a runtime device with numpy arrays: the one place that touches iree.runtime.

Imports only iree.runtime and numpy, so the deployment path needs no JAX.
"""

import functools

import numpy as np
from iree import runtime as rt
from iree.runtime.array_interop import map_dtype_to_element_type

from ._errors import DeviceUnavailableError

# Host-visible memory the device can write into: where results are staged for reading.
_STAGING_MEMORY = int(rt.MemoryType.HOST_LOCAL | rt.MemoryType.DEVICE_VISIBLE)
_STAGING_USAGE = int(rt.BufferUsage.TRANSFER_TARGET | rt.BufferUsage.MAPPING_SCOPED)
_DEVICE_MEMORY = int(rt.MemoryType.DEVICE_LOCAL)
_DEVICE_USAGE = int(rt.BufferUsage.DEFAULT)
_MAPPABLE_MEMORY = int(rt.MemoryType.HOST_VISIBLE)
_MAPPABLE_USAGE = int(rt.BufferUsage.MAPPING_SCOPED)


def open_device(driver: str) -> rt.HalDevice:
  """The first device of ``driver``; DeviceUnavailableError where this machine has none."""
  available = rt.query_available_drivers()
  if driver not in available:
    raise DeviceUnavailableError(
      f"The IREE runtime driver {driver!r} is not available here (available: "
      f"{', '.join(sorted(available))}). Run this module where that device exists, "
      "or compile for a target this machine has ('cpu', 'vulkan')."
    )
  try:
    return rt.get_device(driver, cache=True)
  except (RuntimeError, ValueError) as e:
    raise DeviceUnavailableError(f"The IREE runtime driver {driver!r} is installed but found no device: {e}") from e


@functools.cache
def _element_type(dtype: np.dtype) -> int:
  return map_dtype_to_element_type(dtype)  # cached: it is a chain of issubdtype checks, on every call


class DeviceModule:
  """One IREE module (a ``.vmfb``, with its parameter archives) loaded on a device."""

  def __init__(self, vmfb: bytes, device: rt.HalDevice, *, parameters: dict[str, rt.ParameterIndex] | None = None):
    """Loads ``vmfb`` on ``device``; ``parameters`` maps a parameter scope to its archive's index."""
    self.device = device
    self._mappable: bool | None = None
    self._context = rt.SystemContext(config=rt.Config(device=device))
    providers = [index.create_provider(scope=scope) for scope, index in (parameters or {}).items()]
    if providers:
      self._context.add_vm_module(rt.create_io_parameters_module(self._context.instance, *providers))
    self.vm_module = rt.VmModule.copy_buffer(self._context.instance, vmfb)
    self._context.add_vm_module(self.vm_module)

  @property
  def instance(self) -> rt.VmInstance:
    return self._context.instance

  def function(self, name: str) -> rt.VmFunction:
    function = self.vm_module.lookup_function(name)
    if function is None:
      raise KeyError(f"Module {self.vm_module.name!r} has no function {name!r}.")
    return function

  def to_device(self, array: np.ndarray) -> rt.HalBufferView:
    array = np.asarray(array, order="C")  # not ascontiguousarray: it turns scalars 1-d
    return self.device.allocator.allocate_buffer_copy(
      memory_type=_DEVICE_MEMORY,
      allowed_usage=_DEVICE_USAGE,
      device=self.device,
      buffer=array,
      element_type=_element_type(array.dtype),
    )

  def invoke(self, function: rt.VmFunction, inputs: list) -> list[rt.HalBufferView]:
    """Calls ``function`` on numpy arrays or buffer views already on the device; results stay there."""
    args = rt.VmVariantList(len(inputs))
    for value in inputs:
      args.push_ref(value if isinstance(value, rt.HalBufferView) else self.to_device(value))
    results = rt.VmVariantList(8)
    self._context.vm_context.invoke(function, args, results)
    return [results.get_as_object(i, rt.HalBufferView) for i in range(results.size)]

  def to_host(self, view: rt.HalBufferView, dtype: np.dtype) -> np.ndarray:
    """Copies a device result into a new numpy array.

    Mappable buffers (local-sync, local-task) are read directly. Others go through
    a host staging buffer: Vulkan's host-pointer import, which ``DeviceArray.to_host``
    tries, needs 4096-aligned memory and fails on Mesa's lavapipe.
    """
    shape = tuple(view.shape)
    if self._mappable is None:  # one device's results are all mappable or all not: check once
      buffer = view.get_buffer()
      self._mappable = bool(buffer.memory_type() & _MAPPABLE_MEMORY and buffer.allowed_usage() & _MAPPABLE_USAGE)
    if self._mappable:
      return np.array(view.map().asarray(shape, dtype), copy=True)
    buffer = view.get_buffer()
    staging = self.device.allocator.allocate_buffer(
      memory_type=_STAGING_MEMORY, allowed_usage=_STAGING_USAGE, allocation_size=buffer.byte_length()
    )
    semaphore = self.device.create_semaphore(0)
    self.device.queue_copy(buffer, staging, rt.HalFence.create_at(semaphore, 0), rt.HalFence.create_at(semaphore, 1))
    rt.HalFence.create_at(semaphore, 1).wait()
    return np.array(staging.map().asarray(shape, dtype), copy=True)
