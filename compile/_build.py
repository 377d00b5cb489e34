"""Building: compile a Lowered program with iree-compile for one target."""

import dataclasses
import pathlib
import tempfile
import time

from iree import compiler as ireec

from ._errors import CompileError
from ._files import atomic_directory
from ._lower import Lowered
from ._stablehlo import check_target_support
from ._targets import Target, get_target


@dataclasses.dataclass(frozen=True)
class Compiled:
  """A Lowered program compiled for one target.

  Attributes:
    lowered: what was compiled.
    target: the target it was compiled for.
    flags: the full iree-compile flags used.
    vmfb: the IREE module (VM flatbuffer).
    dispatch_count: executables (GPU kernels) in the module; each costs a launch.
    msl: ``{dispatch name: Metal Shading Language source}``, for ``metal``.
    spirv: ``{dispatch name: SPIR-V binary}``, for the SPIR-V targets (``metal``, ``vulkan``).
    compile_seconds: wall time of iree-compile.
  """

  lowered: Lowered
  target: Target
  flags: tuple[str, ...]
  vmfb: bytes
  dispatch_count: int
  msl: dict[str, str]
  spirv: dict[str, bytes]
  compile_seconds: float

  def save(self, directory: str | pathlib.Path, *, name: str = "module") -> pathlib.Path:
    """Writes ``<name>.vmfb``, ``<name>.mlir``, ``msl/`` and ``spirv/`` into ``directory``, atomically.

    Returns:
      The directory.
    """
    with atomic_directory(directory) as tmp:
      (tmp / f"{name}.vmfb").write_bytes(self.vmfb)
      (tmp / f"{name}.mlir").write_text(self.lowered.mlir)
      _write_all(tmp / "msl", {f"{k}.metal": v.encode() for k, v in self.msl.items()})
      _write_all(tmp / "spirv", {f"{k}.spv": v for k, v in self.spirv.items()})
    return pathlib.Path(directory)


def _write_all(folder: pathlib.Path, files: dict[str, bytes]) -> None:
  if files:
    folder.mkdir()
    for file_name, data in files.items():
      (folder / file_name).write_bytes(data)


def _dispatch_name(path: pathlib.Path) -> str:
  # jit_MLP_call_main_dispatch_3_metal_msl_fb0.metal -> main_dispatch_3
  stem = path.stem
  start = stem.find("main_dispatch_")
  name = stem[start:] if start >= 0 else stem
  parts = name.split("_")
  return "_".join(parts[:3]) if name.startswith("main_dispatch_") else name


def _dump_flags(dump: pathlib.Path) -> list[str]:
  return [
    f"--iree-hal-dump-executable-sources-to={dump / 'sources'}",
    f"--iree-hal-dump-executable-binaries-to={dump / 'binaries'}",
    f"--iree-hal-dump-executable-intermediates-to={dump / 'intermediates'}",
  ]


def _read_dumps(dump: pathlib.Path) -> tuple[int, dict[str, str], dict[str, bytes]]:
  sources = list((dump / "sources").glob("*.mlir"))
  msl = {_dispatch_name(p): p.read_text() for p in sorted((dump / "binaries").glob("*.metal"))}
  # Metal keeps the SPIR-V it translated to MSL as an intermediate; Vulkan ships it as the binary.
  spv_files = [*(dump / "intermediates").glob("*.spv"), *(dump / "binaries").glob("*.spv")]
  spirv = {_dispatch_name(p): p.read_bytes() for p in sorted(spv_files)}
  return len(sources), msl, spirv


def build(
  lowered: Lowered,
  target: str | Target = "cpu",
  *,
  metal_platform: str = "macos",
  cuda_arch: str = "sm_80",
  extra_flags: tuple[str, ...] = (),
) -> Compiled:
  """Compiles ``lowered`` with iree-compile for ``target``.

  Args:
    lowered: from :func:`lower`.
    target: ``metal``, ``cpu``, ``vulkan`` or ``cuda`` (see :func:`get_target`).
    metal_platform: ``macos`` or ``ios``, for ``metal``.
    cuda_arch: e.g. ``sm_80``, for ``cuda`` (see :func:`get_target`).
    extra_flags: more iree-compile flags, appended.

  Raises:
    UnsupportedOpError: an op or type the target cannot compile, found before compiling.
    CompileError: iree-compile failed; carries target, flags and diagnostics.
  """
  target = get_target(target, metal_platform=metal_platform, cuda_arch=cuda_arch)
  check_target_support(lowered.sites, target)
  flags = [*target.flags, *extra_flags]
  with tempfile.TemporaryDirectory(prefix="nnx-metal-") as tmp:
    dump = pathlib.Path(tmp)
    start = time.perf_counter()
    try:
      vmfb = ireec.compile_str(lowered.mlir, input_type="stablehlo", extra_args=[*flags, *_dump_flags(dump)])
    except ireec.CompilerToolError as e:
      raise CompileError(target.name, flags, str(e)) from None
    seconds = time.perf_counter() - start
    dispatch_count, msl, spirv = _read_dumps(dump)
  return Compiled(lowered, target, tuple(flags), vmfb, dispatch_count, msl, spirv, seconds)
