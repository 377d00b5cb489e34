"""Calls an IREE module on a runtime device with numpy arrays: the one place that runs modules.

Every result is checked against what the caller expects (element type, shape, byte
length) before its memory is read, so a wrong manifest cannot read past a buffer.
"""

import math
import re
import threading
import warnings

import numpy as np
from iree import runtime as rt

from . import _dtypes
from ._errors import ArtifactError, DeviceUnavailableError, ExecutionError
from ._targets import CPU_KERNEL_STACK

# 8 times the most stack a cpu kernel may take (IREE's own default is 128 KiB).
TASK_WORKER_STACK = 8 * CPU_KERNEL_STACK

# Host-visible memory the device can write into: where results are staged for reading.
_STAGING_MEMORY = int(rt.MemoryType.HOST_LOCAL | rt.MemoryType.DEVICE_VISIBLE)
_STAGING_USAGE = int(rt.BufferUsage.TRANSFER_TARGET | rt.BufferUsage.MAPPING_SCOPED)
_DEVICE_MEMORY = int(rt.MemoryType.DEVICE_LOCAL)
_DEVICE_USAGE = int(rt.BufferUsage.DEFAULT)
_MAPPABLE_MEMORY = int(rt.MemoryType.HOST_VISIBLE)
_MAPPABLE_USAGE = int(rt.BufferUsage.MAPPING_SCOPED)
# Mesa's lavapipe names its vector width: "llvmpipe (LLVM 15.0.6, 512 bits)"; a lane is 32 bits.
_LAVAPIPE = re.compile(r"llvmpipe \(LLVM [^,]*, (\d+) bits\)")


def lavapipe_lanes(driver: str) -> int | None:
  """The subgroup width of the lavapipe device behind ``driver``, or None if it is not lavapipe."""
  if driver != "vulkan":
    return None
  for device in rt.get_driver(driver).query_available_devices():
    match = _LAVAPIPE.search(device["name"])
    if match:
      return int(match.group(1)) // 32
  return None


# One device per driver and process, shared by every program (as IREE's own cache would), until it is lost.
_DEVICES: dict[str, rt.HalDevice] = {}
_DEVICES_LOCK = threading.Lock()


def open_device(driver: str, *, subgroup_size: int | None = None) -> rt.HalDevice:
  """The first device of ``driver`` (the same one on every call, until it is lost: see ``load_module``).

  Args:
    driver: an IREE runtime driver (``local-sync``, ``vulkan``, ``metal``, ...).
    subgroup_size: the subgroup width the module's kernels assume, if they use
      subgroup operations; checked where the device can tell (lavapipe).

  Raises:
    DeviceUnavailableError: no such driver or device here, or a lavapipe device
      running another subgroup width than the kernels assume.
  """
  available = rt.query_available_drivers()
  if driver not in available:
    raise DeviceUnavailableError(
      f"The IREE runtime driver {driver!r} is not available here (available: {', '.join(sorted(available))}). "
      "Run this module where that device exists, or export for a target this machine has ('cpu', 'vulkan')."
    )
  if driver == "local-task":
    # Before the pool's threads exist: a cpu kernel may take CPU_KERNEL_STACK of stack,
    # more than IREE's default worker stack leaves beside the task system's own frames.
    rt.flags.parse_flags(f"--task_worker_stack_size={TASK_WORKER_STACK}")
  with _DEVICES_LOCK:
    device = _DEVICES.get(driver)
    if device is None:
      try:
        device = _DEVICES[driver] = rt.get_device(driver, cache=False)
      except (RuntimeError, ValueError) as e:
        message = f"The IREE runtime driver {driver!r} is installed but found no device: {e}"
        raise DeviceUnavailableError(message) from e
  lanes = lavapipe_lanes(driver) if subgroup_size else None
  if lanes is not None and lanes != subgroup_size:
    raise DeviceUnavailableError(
      f"These kernels assume {subgroup_size}-wide subgroups, but this lavapipe runs {lanes} lanes. Start Python "
      f"with LP_NATIVE_VECTOR_WIDTH={subgroup_size * 32} MESA_SHADER_CACHE_DISABLE=true in the environment "
      "(lavapipe reads them when it loads)."
    )
  return device


def _device_lost(error: ArtifactError) -> bool:
  # IREE reports a lost device as DATA_LOSS (Vulkan: VK_ERROR_DEVICE_LOST). A module that reached the
  # device was verified first (the artifact's hashes, compile/runtime/_module_check.py), so here it is the device's.
  return "DATA_LOSS" in str(error) or "DEVICE_LOST" in str(error)


def load_module(
  vmfb: bytes, driver: str, *, subgroup_size: int | None, parameters: dict[str, rt.ParameterIndex]
) -> "DeviceModule":
  """``vmfb`` loaded on ``driver``'s device, on a new device if that one is lost while it loads.

  A lost device (a GPU reset; Mesa's lavapipe now and then under load, at a parameter upload) stays
  lost: every later load and call on it fails. Loading starts from the artifact's bytes, so it can
  start over on a new device; the programs already on the lost one cannot (their state was there),
  and their calls fail with ExecutionError. Only a load is retried, once, with a warning.
  """
  device = open_device(driver, subgroup_size=subgroup_size)
  try:
    return DeviceModule(vmfb, device, parameters=parameters)
  except ArtifactError as e:
    if not _device_lost(e):
      raise
    warnings.warn(f"The {driver} device was lost while loading a module ({e}); loading it anew.", stacklevel=3)
    with _DEVICES_LOCK:
      if _DEVICES.get(driver) is device:  # another thread may have replaced it already
        del _DEVICES[driver]
    return DeviceModule(vmfb, open_device(driver, subgroup_size=subgroup_size), parameters=parameters)


class DeviceModule:
  """One IREE module (a ``.vmfb``, with its parameter archives) loaded on a device. Not thread-safe."""

  def __init__(self, vmfb: bytes, device: rt.HalDevice, *, parameters: dict[str, rt.ParameterIndex] | None = None):
    """Loads ``vmfb`` on ``device``; ``parameters`` maps a parameter scope to its archive's index."""
    self.device = device
    self._mappable: bool | None = None
    try:
      self._context = rt.SystemContext(config=rt.Config(device=device))
      providers = [index.create_provider(scope=scope) for scope, index in (parameters or {}).items()]
      if providers:
        self._context.add_vm_module(rt.create_io_parameters_module(self._context.instance, *providers))
      self.vm_module = rt.VmModule.copy_buffer(self._context.instance, vmfb)
      self._context.add_vm_module(self.vm_module)
    except Exception as e:  # noqa: BLE001 - IREE's loader on a module it refuses: whatever it raises
      raise ArtifactError(f"The module cannot be loaded on this device ({type(e).__name__}: {e}).") from None

  def function(self, name: str) -> rt.VmFunction:
    function = self.vm_module.lookup_function(name)
    if function is None:
      raise ArtifactError(f"The module {self.vm_module.name!r} has no function {name!r}.")
    return function

  def to_device(self, array: np.ndarray) -> rt.HalBufferView:
    array = np.asarray(array, order="C")  # not ascontiguousarray: it turns scalars 1-d
    entry = _dtypes.DTYPES[array.dtype.name]
    return self.device.allocator.allocate_buffer_copy(
      memory_type=_DEVICE_MEMORY,
      allowed_usage=_DEVICE_USAGE,
      device=self.device,
      buffer=_dtypes.plain(array),
      element_type=entry.hal,
    )

  def invoke(self, function: rt.VmFunction, inputs: list) -> list[rt.HalBufferView]:
    """Calls ``function`` on numpy arrays or buffer views already on the device; results stay there."""
    args = rt.VmVariantList(len(inputs))
    for value in inputs:
      args.push_ref(value if isinstance(value, rt.HalBufferView) else self.to_device(value))
    results = rt.VmVariantList(8)
    try:
      self._context.vm_context.invoke(function, args, results)
      return [results.get_as_object(i, rt.HalBufferView) for i in range(results.size)]
    except Exception as e:  # noqa: BLE001 - the device's error, whatever type iree.runtime gives it
      raise ExecutionError(f"{function.name} failed on the device ({type(e).__name__}: {e}).") from None

  def to_host(self, view: rt.HalBufferView, shape: tuple[int, ...], dtype_name: str) -> np.ndarray:
    """Copies a device result into a new numpy array, after checking it is ``dtype_name[shape]``.

    Mappable buffers (local-sync, local-task) are read directly. Others go through
    a host staging buffer: Vulkan's host-pointer import, which ``DeviceArray.to_host``
    tries, needs 4096-aligned memory and fails on Mesa's lavapipe.

    Raises:
      ArtifactError: the result is not what the manifest promised.
    """
    entry = _dtypes.DTYPES[dtype_name]
    nbytes = math.prod(shape) * entry.numpy.itemsize
    got = (view.element_type, tuple(view.shape), view.byte_length)
    if got[0] not in entry.accepted or got[1:] != (shape, nbytes):
      raise ArtifactError(
        f"The module returned a {_dtypes.hal_name(got[0])}{list(got[1])} buffer of {got[2]} bytes where its "
        "manifest promises "
        f"{dtype_name}{list(shape)} ({nbytes} bytes): the manifest does not describe this module. Export again."
      )
    buffer = view.get_buffer()
    if buffer.byte_length() < nbytes:
      raise ArtifactError(f"The module returned a buffer of {buffer.byte_length()} bytes for {nbytes} bytes of data.")
    if self._mappable is None:  # one device's results are all mappable or all not: check once
      self._mappable = bool(buffer.memory_type() & _MAPPABLE_MEMORY and buffer.allowed_usage() & _MAPPABLE_USAGE)
    mapped = view.map() if self._mappable else self._staged(buffer).map()
    raw = mapped.asarray((nbytes,), np.dtype(np.uint8))
    return np.frombuffer(raw, entry.numpy).reshape(shape).copy()

  def _staged(self, buffer: rt.HalBuffer) -> rt.HalBuffer:
    staging = self.device.allocator.allocate_buffer(
      memory_type=_STAGING_MEMORY, allowed_usage=_STAGING_USAGE, allocation_size=buffer.byte_length()
    )
    semaphore = self.device.create_semaphore(0)
    self.device.queue_copy(buffer, staging, rt.HalFence.create_at(semaphore, 0), rt.HalFence.create_at(semaphore, 1))
    rt.HalFence.create_at(semaphore, 1).wait()
    return staging
