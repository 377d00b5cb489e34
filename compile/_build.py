"""Building: compile a Lowered program with iree-compile for one target."""

import dataclasses
import pathlib
import re
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


def _dispatch_name(path: pathlib.Path, module_name: str) -> str:
  # <module>_<function>_dispatch_3_metal_msl_fb0.metal -> <function>_dispatch_3
  stem = path.stem.removeprefix(f"{module_name}_")
  match = re.match(r"(.*?_dispatch_\d+)", stem)
  return match.group(1) if match else stem


def _dump_flags(dump: pathlib.Path) -> list[str]:
  return [
    f"--iree-hal-dump-executable-sources-to={dump / 'sources'}",
    f"--iree-hal-dump-executable-binaries-to={dump / 'binaries'}",
    f"--iree-hal-dump-executable-intermediates-to={dump / 'intermediates'}",
  ]


def _read_dumps(dump: pathlib.Path, module_name: str) -> tuple[tuple[str, ...], dict[str, str], dict[str, bytes]]:
  names = {_dispatch_name(p, module_name) for p in (dump / "sources").glob("*.mlir")}
  dispatches = tuple(sorted(names, key=lambda name: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]))
  msl = {_dispatch_name(p, module_name): p.read_text() for p in sorted((dump / "binaries").glob("*.metal"))}
  # Metal keeps the SPIR-V it translated to MSL as an intermediate; Vulkan ships it as the binary.
  spv_files = [*(dump / "intermediates").glob("*.spv"), *(dump / "binaries").glob("*.spv")]
  spirv = {_dispatch_name(p, module_name): p.read_bytes() for p in sorted(spv_files)}
  return dispatches, msl, spirv


@dataclasses.dataclass(frozen=True)
class Binary:
  """What iree-compile made of one MLIR module.

  Attributes:
    vmfb: the IREE module (VM flatbuffer).
    flags: the full iree-compile flags used.
    dispatches: the names of its executables (GPU kernels), ``<function>_dispatch_<n>``.
    msl: ``{dispatch name: Metal Shading Language source}``, for ``metal``.
    spirv: ``{dispatch name: SPIR-V binary}``, for the SPIR-V targets.
    compile_seconds: wall time of iree-compile.
    calls: dispatches launched per public function, when counted (programs).
  """

  vmfb: bytes
  flags: tuple[str, ...]
  dispatches: tuple[str, ...]
  msl: dict[str, str]
  spirv: dict[str, bytes]
  compile_seconds: float
  calls: dict[str, int] = dataclasses.field(default_factory=dict)


def _dispatch_calls(mlir: str, flags: tuple[str, ...]) -> dict[str, int]:
  """``flow.dispatch`` ops per public function after dispatch formation.

  Executables are deduplicated across functions (and named after the first), so
  counting them per name undercounts; the flow-level calls are what each function launches.
  """
  flow = ireec.compile_str(mlir, input_type="stablehlo", extra_args=[*flags, "--compile-to=flow"]).decode()
  calls, function = {}, None
  for line in flow.splitlines():
    header = re.match(r"\s*(?:util|func)\.func public @([\w$.]+)\(", line)
    if header:
      function = header.group(1)
      calls[function] = 0
    elif function is not None and "flow.dispatch @" in line:
      calls[function] += 1
  return calls


# iree-org/iree#24753 (open, since IREE 3.12): modules with a stablehlo.while fail at
# run time with "indirect buffer reference slot 0 is out range of the declared binding
# capacity", from command buffers recorded with indirect bindings: memoized ones (per
# call) and those of constant expressions hoisted into initializers (at load). Turning
# off only one or two of the three features below left other programs failing. JAX
# emits while loops for fori_loop/scan and inside its threefry PRNG (Dropout), so such
# modules turn all three off; loop-free modules keep them.
_WHILE_LOOP_FLAGS = (
  "--iree-hal-memoization=false",
  "--iree-hal-indirect-command-buffers=false",
  "--iree-opt-const-expr-hoisting=false",
)


def module_flags(mlir: str, target: Target, extra_flags: tuple[str, ...] = ()) -> tuple[str, ...]:
  """Every iree-compile flag ``compile_module`` uses for ``mlir`` on ``target``."""
  workarounds = _WHILE_LOOP_FLAGS if "stablehlo.while" in mlir else ()
  return (*target.flags, *workarounds, *extra_flags)


def compile_module(
  mlir: str, module_name: str, target: Target, extra_flags: tuple[str, ...] = (), *, count_calls: bool = False
) -> Binary:
  """Runs iree-compile on ``mlir`` (StableHLO, possibly with util globals) for ``target``.

  Raises:
    CompileError: iree-compile failed; carries target, flags and diagnostics.
  """
  flags = module_flags(mlir, target, extra_flags)
  with tempfile.TemporaryDirectory(prefix="nnx-metal-") as tmp:
    dump = pathlib.Path(tmp)
    start = time.perf_counter()
    try:
      vmfb = ireec.compile_str(mlir, input_type="stablehlo", extra_args=[*flags, *_dump_flags(dump)])
    except ireec.CompilerToolError as e:
      raise CompileError(target.name, list(flags), str(e)) from None
    seconds = time.perf_counter() - start
    dispatches, msl, spirv = _read_dumps(dump, module_name)
  calls = _dispatch_calls(mlir, flags) if count_calls else {}
  return Binary(vmfb, flags, dispatches, msl, spirv, seconds, calls)


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
  binary = compile_module(lowered.mlir, f"jit_{lowered.name}", target, extra_flags)
  return Compiled(
    lowered,
    target,
    binary.flags,
    binary.vmfb,
    len(binary.dispatches),
    binary.msl,
    binary.spirv,
    binary.compile_seconds,
  )
