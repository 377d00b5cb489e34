"""The compile targets: each names its iree-compile backend, its runtime drivers and its flags."""

import dataclasses
import shutil

from ._errors import UnknownTargetError

# IREE's HAL has no element type for these MX float formats (iree-compile 3.13
# fails with "'hal.element_type' op unsupported element type" on every target).
_NO_HAL_ELEMENT_TYPE = ("f4E2M1FN", "f6E2M3FN", "f6E3M2FN")


@dataclasses.dataclass(frozen=True)
class Target:
  """One IREE compile target.

  Attributes:
    name: nnx-metal's name for it (``metal``, ``cpu``, ``vulkan``, ``cuda``).
    backend: the iree-compile HAL backend.
    drivers: iree-runtime drivers that can run its modules, preferred first.
    flags: the iree-compile flags that select it.
    demote_f64: whether f64 is demoted to f32 (see ``docs/dtypes.md``).
    unsupported_types: MLIR element types the target cannot compile at all.
    spirv: whether its dispatches go through SPIR-V (dumped and validated).
  """

  name: str
  backend: str
  drivers: tuple[str, ...]
  flags: tuple[str, ...]
  demote_f64: bool = False
  unsupported_types: tuple[str, ...] = _NO_HAL_ELEMENT_TYPE
  spirv: bool = False


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
  return Target(
    name="metal",
    backend="metal-spirv",
    drivers=("metal",),
    flags=(
      "--iree-hal-target-backends=metal-spirv",
      f"--iree-metal-target-platform={platform}",
      f"--iree-metal-compile-to-metallib={'true' if has_metal_toolchain else 'false'}",
      *_DEMOTE_F64,
    ),
    demote_f64=True,
    spirv=True,
  )


def _cpu() -> Target:
  return Target(
    name="cpu",
    backend="llvm-cpu",
    drivers=("local-sync", "local-task"),
    flags=(
      "--iree-hal-target-device=local",
      "--iree-hal-local-target-device-backends=llvm-cpu",
      "--iree-llvmcpu-target-cpu=host",
      *_KEEP_F64,
    ),
  )


def _vulkan() -> Target:
  return Target(
    name="vulkan",
    backend="vulkan-spirv",
    drivers=("vulkan",),
    flags=("--iree-hal-target-backends=vulkan-spirv", *_DEMOTE_F64),
    demote_f64=True,
    spirv=True,
  )


def _cuda(arch: str) -> Target:
  return Target(
    name="cuda",
    backend="cuda",
    drivers=("cuda",),
    flags=("--iree-hal-target-device=cuda", f"--iree-cuda-target={arch}", *_KEEP_F64),
  )


TARGET_NAMES = ("metal", "cpu", "vulkan", "cuda")


def get_target(name: str | Target, *, metal_platform: str = "macos", cuda_arch: str = "sm_80") -> Target:
  """Returns the :class:`Target` called ``name``.

  Args:
    name: one of ``metal``, ``cpu``, ``vulkan``, ``cuda`` (or a Target, returned as is).
    metal_platform: ``macos`` or ``ios``, for ``metal``.
    cuda_arch: the GPU architecture for ``cuda``. iree-compile 3.13 knows up to
      ``sm_89`` (no ``sm_90`` target description, iree-org/iree#22147); PTX built
      for ``sm_80`` is JIT-compiled forward by the driver on Hopper and later GPUs.

  Raises:
    UnknownTargetError: ``name`` is not a known target.
  """
  if isinstance(name, Target):
    return name
  if name == "metal":
    return _metal(metal_platform)
  if name == "cpu":
    return _cpu()
  if name == "vulkan":
    return _vulkan()
  if name == "cuda":
    return _cuda(cuda_arch)
  raise UnknownTargetError(f"Unknown target {name!r}; expected one of {', '.join(TARGET_NAMES)}.")
