"""The compile targets: each names its IREE backend, runtime drivers, flags and the rewrites its code generation needs.

``metal-vulkan`` is the Metal stand-in: the Metal target's own device description
(capabilities, 8/16-bit storage, limits) compiled by the Vulkan backend, with the
subgroup width lavapipe really executes, so Metal's code generation runs on Mesa's
CPU Vulkan driver (see ``docs/metal-correctness.md``).

Imports the standard library only; descriptions are asked of iree-compile when needed.
"""

import dataclasses
import functools
import re
import shutil

from . import rewrites
from .runtime import (
  CPU_KERNEL_STACK,
  RUNTIME_TARGETS,
  STANDIN_SUBGROUP_SIZE,
  TARGET_NAMES,
  RuntimeTarget,
  UnknownTargetError,
)

# IREE's HAL has no element type for these MX float formats (iree-compile 3.13
# fails with "'hal.element_type' op unsupported element type" on every target).
_NO_HAL = "IREE has no HAL element type for it (on any target); convert to a type IREE supports, e.g. bfloat16"
_NO_HAL_ELEMENT_TYPE = (("f4E2M1FN", _NO_HAL), ("f6E2M3FN", _NO_HAL), ("f6E3M2FN", _NO_HAL))


@dataclasses.dataclass(frozen=True)
class Target:
  """One IREE compile target: what the runtime knows of it (``runtime``) and how to compile for it.

  Attributes:
    runtime: its name, backend, drivers and f64 demotion, as artifacts record them.
    flags: the iree-compile flags that select it.
    unsupported_types: ``(MLIR element type prefix, why and what to do)`` it cannot compile.
    spirv: whether its kernels are SPIR-V (dumped, validated, checked for races).
    rewrites: the StableHLO rewrites its code generation needs (``compile.rewrites``).
    description: for a SPIR-V target, the IREE GPU target description to compile with
      instead of the backend's default (the stand-in), else None.
    speed_flags: optimizations that are not needed for correctness; ``export`` compiles
      again without them where iree-compile fails with them.
  """

  runtime: RuntimeTarget
  flags: tuple[str, ...]
  unsupported_types: tuple[tuple[str, str], ...] = _NO_HAL_ELEMENT_TYPE
  spirv: bool = False
  rewrites: tuple[str, ...] = ()
  description: str | None = None
  speed_flags: tuple[str, ...] = ()

  @property
  def name(self) -> str:
    return self.runtime.name

  @property
  def backend(self) -> str:
    return self.runtime.backend

  @property
  def demote_f64(self) -> bool:
    return self.runtime.demote_f64


# Apple GPUs have no f64: on the SPIR-V targets f64 is demoted to f32 at compile
# time and cast back on the host, so a model built with jax_enable_x64 compiles.
# i64 is NOT demoted: JAX's threefry PRNG builds its counters with a ui64 iota
# split into hi/lo words by a 32-bit shift, and demoting that silently changes
# every Dropout mask. IREE's SPIR-V code generation handles (or emulates) i64.
_DEMOTE_F64 = ("--iree-input-demote-f64-to-f32",)
# iree-compile 3.13 demotes f64 by default on every target; CPU and CUDA have f64.
_KEEP_F64 = ("--iree-input-demote-f64-to-f32=false",)

METAL_PLATFORMS = ("macos", "ios")


def _metal(platform: str) -> Target:
  if platform not in METAL_PLATFORMS:
    raise UnknownTargetError(f"Unknown Metal platform {platform!r}; expected one of {METAL_PLATFORMS}.")
  # Without Apple's `metal` toolchain IREE embeds MSL source, which the Metal
  # driver compiles on first load; with it, a precompiled .metallib.
  has_metal_toolchain = shutil.which("xcrun") is not None and shutil.which("metal") is not None
  flags = (
    "--iree-hal-target-backends=metal-spirv",
    f"--iree-metal-target-platform={platform}",
    f"--iree-metal-compile-to-metallib={'true' if has_metal_toolchain else 'false'}",
    *_DEMOTE_F64,
  )
  return Target(RUNTIME_TARGETS["metal"], flags, spirv=True, rewrites=rewrites.SPIRV)


def _metal_vulkan() -> Target:
  description = re.sub(
    r"subgroup_size_choices = \[\d+\]", f"subgroup_size_choices = [{STANDIN_SUBGROUP_SIZE}]", metal_description()
  )
  return Target(
    RUNTIME_TARGETS["metal-vulkan"], _DEMOTE_F64, spirv=True, rewrites=rewrites.SPIRV, description=description
  )


def _without_16_bit_floats(description: str, name: str) -> tuple[tuple[str, str], ...]:
  """The 16-bit floats a device description cannot hold: IREE's emulation of them miscompiles (NaNs)."""
  compute = re.search(r"compute = ([\w|]+)", description).group(1).split("|")
  storage = re.search(r"storage = ([\w|]+)", description).group(1).split("|")
  if "fp16" in compute and "b16" in storage:
    return ()
  why = (
    f"IREE's {name!r} Vulkan target has no 16-bit float storage or arithmetic, and IREE 3.13 miscompiles "
    "its emulation (NaNs); compute in float32, or export for the default 'vulkan' profile or 'metal-vulkan'"
  )
  return (("f16", why), ("bf16", why))


def _vulkan(vulkan_target: str | None) -> Target:
  if vulkan_target is not None:  # one of IREE's named Vulkan targets, as IREE describes it
    flags = ("--iree-hal-target-backends=vulkan-spirv", f"--iree-vulkan-target={vulkan_target}", *_DEMOTE_F64)
    narrow = _without_16_bit_floats(_description_for(flags[:2]), vulkan_target)
    return Target(
      RUNTIME_TARGETS["vulkan"],
      flags,
      unsupported_types=_NO_HAL_ELEMENT_TYPE + narrow,
      spirv=True,
      rewrites=rewrites.SPIRV,
    )
  return Target(
    RUNTIME_TARGETS["vulkan"],
    _DEMOTE_F64,
    spirv=True,
    rewrites=rewrites.SPIRV,
    description=portable_vulkan_description(),
  )


# Data tiling packs matrix-product operands into the tiles the CPU's microkernels
# (ukernels) take: measured 3x faster on a 784-1024x4 MLP (docs/benchmarks.md).
# IREE 3.13 leaves it off by default on llvm-cpu, and fails on some programs with it
# (a vector-matrix product of batch 1 in a train step: "'iree_codegen.load_from_buffer'
# op buffer and tensor shapes must be compatible"): those compile without it.
_CPU_DATA_TILING = ("--iree-opt-data-tiling=true", "--iree-llvmcpu-enable-ukernels=all")
# cpu kernels get CPU_KERNEL_STACK of stack (see compile/runtime/_targets.py for why).
_CPU_STACK = (f"--iree-llvmcpu-stack-allocation-limit={CPU_KERNEL_STACK}",)


def _cpu() -> Target:
  flags = (
    "--iree-hal-target-device=local",
    "--iree-hal-local-target-device-backends=llvm-cpu",
    "--iree-llvmcpu-target-cpu=host",
    *_KEEP_F64,
  )
  speed = (*_CPU_DATA_TILING, *_CPU_STACK)
  return Target(RUNTIME_TARGETS["cpu"], flags, rewrites=rewrites.CPU, speed_flags=speed)


def _cuda(arch: str) -> Target:
  flags = ("--iree-hal-target-device=cuda", f"--iree-cuda-target={arch}", *_KEEP_F64)
  return Target(RUNTIME_TARGETS["cuda"], flags, rewrites=rewrites.COMMON)


def get_target(
  name: str | Target,
  *,
  metal_platform: str = "macos",
  cuda_arch: str = "sm_80",
  vulkan_target: str | None = None,
) -> Target:
  """Returns the :class:`Target` called ``name``.

  Args:
    name: one of ``metal``, ``metal-vulkan``, ``vulkan``, ``cpu``, ``cuda`` (or a Target, returned as is).
    metal_platform: ``macos`` or ``ios``, for ``metal``.
    cuda_arch: the GPU architecture for ``cuda``. iree-compile 3.13 knows up to
      ``sm_89`` (no ``sm_90`` target description, iree-org/iree#22147); PTX built
      for ``sm_80`` is JIT-compiled forward by the driver on Hopper and later GPUs.
    vulkan_target: for ``vulkan``, an IREE Vulkan target (``valhall4``, ``rdna3``,
      ``ampere``, ...); default IREE's portable ``vp_android_baseline_2022`` profile.

  Raises:
    UnknownTargetError: ``name`` is not a known target.
  """
  if isinstance(name, Target):
    return name
  makers = {
    "metal": lambda: _metal(metal_platform),
    "metal-vulkan": _metal_vulkan,
    "vulkan": lambda: _vulkan(vulkan_target),
    "cpu": _cpu,
    "cuda": lambda: _cuda(cuda_arch),
  }
  if name not in makers:
    raise UnknownTargetError(f"Unknown target {name!r}; expected one of {', '.join(TARGET_NAMES)}.")
  return makers[name]()


_PROBE = "func.func @main(%a: tensor<4xf32>) -> tensor<4xf32> {\n  return %a : tensor<4xf32>\n}"


@functools.cache
def _description_for(flags: tuple[str, ...]) -> str:
  from iree import compiler as ireec

  probe = _PROBE.replace("return %a", "%0 = stablehlo.add %a, %a : tensor<4xf32>\n  return %0")
  try:
    text = ireec.compile_str(probe, input_type="stablehlo", extra_args=[*flags, "--compile-to=executable-sources"])
  except ireec.CompilerToolError as e:
    error = next((line for line in str(e).splitlines() if "error:" in line), str(e).splitlines()[0])
    raise UnknownTargetError(f"iree-compile does not know the target {' '.join(flags)}: {error.strip()}") from None
  match = re.search(r"iree_codegen\.target_info = (#iree_gpu\.target<.*?>>)", text.decode())
  if match is None:
    raise UnknownTargetError(f"iree-compile reported no GPU target description for flags {' '.join(flags)}.")
  return match.group(1)


def portable_vulkan_description() -> str:
  """nnx-metal's default Vulkan profile: IREE's portable baseline, plus 8- and 16-bit storage and arithmetic.

  IREE's default, ``vp_android_baseline_2022``, has 32-bit storage only; IREE 3.13
  emulates narrower types there and gets it wrong (float16 gives NaN, a bool mask
  written as packed bytes is read back from the wrong offset, see
  ``docs/metal-correctness.md``). Every desktop GPU, Apple GPUs through MoltenVK and
  most Android GPUs since 2019 have 8/16-bit storage. No subgroup operations, so its
  kernels run at any subgroup width.
  """
  baseline = _description_for(("--iree-hal-target-backends=vulkan-spirv",))
  widened = re.sub(r"compute = [\w|]+", "compute = fp32|fp16|int32|int16|int8", baseline)
  return re.sub(r"storage = [\w|]+", "storage = b32|b16|b8", widened)


def metal_description() -> str:
  """The IREE GPU target description the ``metal`` target compiles with (Apple GPUs)."""
  return _description_for(("--iree-hal-target-backends=metal-spirv",))


def description(target: Target) -> str | None:
  """The IREE GPU target description ``target``'s kernels are compiled for; None where it is no SPIR-V target."""
  if not target.spirv:
    return None
  if target.description is not None:
    return target.description
  return _description_for(
    tuple(f for f in target.flags if f.startswith(("--iree-hal-target-backends", "--iree-vulkan")))
  )


def device_targets_attribute(target: Target) -> str | None:
  """The ``hal.device.targets`` module attribute that selects ``target.description``, else None."""
  if target.description is None:
    return None
  info = f"{{iree_codegen.target_info = {target.description}}}"
  executable = f'#hal.executable.target<"{target.backend}", "vulkan-spirv-fb", {info}>'
  return f'hal.device.targets = [#hal.device.target<"vulkan", [{executable}]> : !hal.device]'
