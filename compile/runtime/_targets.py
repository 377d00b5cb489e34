"""What running a target's modules needs to know, without a compiler: one record per target.

The compiler's :class:`compile.Target` holds one of these (``Target.runtime``) and adds
how to compile for it; a manifest records the name and is checked against the record.
"""

import dataclasses
from collections.abc import Iterable
from typing import Any

TARGET_NAMES = ("metal", "metal-vulkan", "vulkan", "cpu", "cuda")

# lavapipe (Mesa 22.3) runs subgroup operations over at most 16 lanes: with
# LP_NATIVE_VECTOR_WIDTH=1024 it reports 32 but a subgroup reduction adds only 16.
STANDIN_SUBGROUP_SIZE = 16

# A data-tiled product with its fused epilogue can need more than IREE's default
# 32 KiB of stack per kernel (34 KiB in a transformer's train step, 66 KiB in a
# 1024-wide MLP's). Split instead by export's isolation, the transformer's train step
# failed at run time (IREE 3.13 recorded a copy into a command buffer with no binding
# capacity), so cpu kernels are compiled for 128 KiB, and the runtime gives local-task's
# worker threads 1 MiB of stack instead of IREE's 128 KiB (_device.py).
CPU_KERNEL_STACK = 128 * 1024

# IREE's thread pool (local-task) costs about 0.07 ms a call more than running on the
# caller's thread (local-sync), and pays from about 40 MFLOP a call on 2 cores (3 chained
# matrix products: 3.9x slower at 0.2 MFLOP, 1.25x at 25, 0.92x at 50, 0.61x at 1600).
# More cores only lower the crossing, so a program with one function that large runs on
# the pool.
PARALLEL_MIN_FLOPS = 40e6


@dataclasses.dataclass(frozen=True)
class RuntimeTarget:
  """A compile target as the runtime sees it.

  Attributes:
    name: nnx-metal's name for it (``metal``, ``metal-vulkan``, ``vulkan``, ``cpu``, ``cuda``).
    backend: the iree-compile HAL backend its kernels come from.
    drivers: iree-runtime drivers that can run its modules, preferred first.
    demote_f64: whether the device holds f64 as f32 (see ``docs/dtypes.md``).
    kernel_format: the executable format its kernels have in a module (a prefix of it).
    subgroup_size: the subgroup width its kernels assume, where the device must be checked.
    parallel_driver: the driver for programs with a function of at least
      ``PARALLEL_MIN_FLOPS`` a call, where it is not the first.
  """

  name: str
  backend: str
  drivers: tuple[str, ...]
  demote_f64: bool
  kernel_format: str
  subgroup_size: int | None = None
  parallel_driver: str | None = None

  def default_driver(self, flops_per_call: Iterable[float]) -> str:
    """The driver ``artifact.load()`` picks for a program whose functions cost ``flops_per_call``."""
    if self.parallel_driver and max(flops_per_call, default=0.0) >= PARALLEL_MIN_FLOPS:
      return self.parallel_driver
    return self.drivers[0]

  @property
  def constant_state(self) -> bool:
    """Whether state that no function writes is constant on the device (an immutable global).

    IREE then prepares what depends on it (transposed, re-packed weights) once at load, not in
    every call (compile/_assemble.py). On cpu only: on lavapipe, modules with immutable parameter
    globals lost the device at load now and then when two test workers ran at once, and IREE's f64
    demotion (the GPU targets) fails to compile them; the GPU targets keep every leaf mutable.
    """
    return self.backend == "llvm-cpu"

  def to_json(self) -> dict[str, Any]:
    return {"name": self.name, "backend": self.backend, "drivers": list(self.drivers), "demote_f64": self.demote_f64}


RUNTIME_TARGETS = {
  "metal": RuntimeTarget("metal", "metal-spirv", ("metal",), True, "metal-msl-fb"),
  "metal-vulkan": RuntimeTarget(
    "metal-vulkan", "vulkan-spirv", ("vulkan",), True, "vulkan-spirv-fb", subgroup_size=STANDIN_SUBGROUP_SIZE
  ),
  "vulkan": RuntimeTarget("vulkan", "vulkan-spirv", ("vulkan",), True, "vulkan-spirv-fb"),
  "cpu": RuntimeTarget("cpu", "llvm-cpu", ("local-sync", "local-task"), False, "embedded-elf-", None, "local-task"),
  "cuda": RuntimeTarget("cuda", "cuda", ("cuda",), False, "cuda-nvptx-fb"),
}
assert tuple(RUNTIME_TARGETS) == TARGET_NAMES
