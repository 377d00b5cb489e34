"""Running iree-compile on a module and reading back what it made: the module, its kernels and where they came from.

The compile runs in two phases over one set of flags: to IREE's ``flow`` level
(printed with debug locations), then from there to the module. The flow text tells
how many kernels each function launches and which StableHLO ops every kernel was
formed from (each op carries a site tag, see ``_stablehlo.py``), at no extra cost:
the two phases produce the same module as one. Kernel binaries (and, for Metal,
the SPIR-V it was translated from) are dumped into a temporary directory whose
path never reaches the module, so builds are byte-reproducible.
"""

import dataclasses
import math
import os
import pathlib
import re
import tempfile
import time
from collections.abc import Mapping

from iree import compiler as ireec

from ._stablehlo import OpSite, site_tags
from ._targets import Target, device_targets_attribute
from .runtime import MODULE, CompileError, NnxMetalError, kernel_file


@dataclasses.dataclass(frozen=True)
class Binary:
  """What iree-compile made of one MLIR module.

  Attributes:
    vmfb: the IREE module (VM flatbuffer).
    flags: the full iree-compile flags used.
    dispatches: the names of its kernels, ``<function>_dispatch_<n>``.
    msl: ``{kernel: Metal Shading Language source}``, for ``metal``.
    spirv: ``{kernel: SPIR-V binary}``, for the SPIR-V targets.
    compile_seconds: wall time of iree-compile.
    calls: kernels launched per call of each public function.
    origins: ``{kernel: [(scope, site index), ...]}``: the StableHLO ops it was formed from.
  """

  vmfb: bytes
  flags: tuple[str, ...]
  dispatches: tuple[str, ...]
  msl: dict[str, str]
  spirv: dict[str, bytes]
  compile_seconds: float
  calls: dict[str, int]
  origins: dict[str, list[tuple[str, int]]]

  def files(self) -> dict[str, bytes]:
    """The artifact files it makes: the module and each kernel's MSL and SPIR-V, named as artifacts name them."""
    files = {MODULE: self.vmfb}
    files |= {kernel_file("msl", name): source.encode() for name, source in self.msl.items()}
    return files | {kernel_file("spirv", name): data for name, data in self.spirv.items()}


# iree-org/iree#24753 (open, since IREE 3.12): modules with a stablehlo.while fail at
# run time with "indirect buffer reference slot 0 is out range of the declared binding
# capacity", from command buffers recorded with indirect bindings: memoized ones (per
# call) and those of constant expressions hoisted into initializers (at load). Turning
# off only one or two of the three features below left other programs failing. JAX
# emits while loops for fori_loop/scan and inside its threefry PRNG (Dropout), so such
# modules turn all three off; loop-free modules keep them. That also turns off the
# preparation of constant weights at load (compile/_assemble.py) in modules with loops.
# Limiting the hoisting instead (--iree-opt-const-expr-max-size-increase-threshold=0)
# ran a 2-layer GPT's generate loop, but GPT-2 small's failed with the same error.
_WHILE_LOOP_FLAGS = (
  "--iree-hal-memoization=false",
  "--iree-hal-indirect-command-buffers=false",
  "--iree-opt-const-expr-hoisting=false",
)


def module_flags(mlir: str, target: Target, extra_flags: tuple[str, ...] = ()) -> tuple[str, ...]:
  """Every iree-compile flag ``compile_module`` uses for ``mlir`` on ``target``."""
  workarounds = _WHILE_LOOP_FLAGS if "stablehlo.while" in mlir else ()
  return (*target.flags, *target.speed_flags, *workarounds, *extra_flags)


def _with_device_targets(mlir: str, target: Target) -> str:
  """Selects ``target.description`` by a ``hal.device.targets`` attribute on the module (the stand-in)."""
  attribute = device_targets_attribute(target)
  if attribute is None:
    return mlir
  header = re.search(r"^module @[\w$.]+( attributes \{)?", mlir, re.MULTILINE)
  if header is None:
    raise ValueError("the MLIR has no named top-level module")
  if header.group(1):
    return f"{mlir[: header.end()]}{attribute}, {mlir[header.end() :]}"
  return f"{mlir[: header.end()]} attributes {{{attribute}}}{mlir[header.end() :]}"


def _culprit(diagnostics: str, sites: Mapping[str, tuple[OpSite, ...]]) -> str:
  """``<first error>\n  at <StableHLO op> at <file:line>`` for what iree-compile printed."""
  first = re.search(r"error: (.*)$", diagnostics, re.MULTILINE)
  if first is None:
    return ""
  located = re.search(r"^(\S+:\d+:\d+): error:", diagnostics, re.MULTILINE)
  where = ""
  if located:
    ops = [site.describe() for scope in sites.values() for site in scope if site.frames[:1] == (located.group(1),)]
    where = "; ".join(dict.fromkeys(ops)) or located.group(1)
  error = re.sub(r" loc\(.*$", "", first.group(1)).strip()  # the op's location follows; it is printed below
  return f"{error}\n  at {where}\n" if where else f"{error}\n"


def _threading_flags() -> list[str]:
  """``--mlir-disable-threading`` where ``$NNX_METAL_COMPILE_SERIAL`` is ``1``.

  iree-compile spreads a module over every core. Where several compiles already run at
  once (a test run with a worker per core, a parallel build), one thread each does the
  same work with less CPU: 14% less for the compiles of tests/test_programs.py run two at a
  time on 2 cores. The output is the same (tested), so the flag is left out of the flags an
  artifact records and of the compile cache's key.
  """
  serial = os.environ.get("NNX_METAL_COMPILE_SERIAL", "")
  if serial not in ("", "0", "1"):
    raise NnxMetalError(f"NNX_METAL_COMPILE_SERIAL={serial!r}: set it to 1 (compile on one thread) or unset it")
  return ["--mlir-disable-threading"] if serial == "1" else []


def _run(text: str, flags: list[str], target: Target, sites: Mapping[str, tuple[OpSite, ...]]) -> bytes:
  try:
    return ireec.compile_str(text, input_type="stablehlo", extra_args=[*flags, *_threading_flags()])
  except ireec.CompilerToolError as e:
    diagnostics = str(e)
    raise CompileError(target.name, flags, diagnostics, culprit=_culprit(diagnostics, sites)) from None


def _dispatch_name(path: pathlib.Path, module_name: str) -> str:
  # <module>_<function>_dispatch_3_metal_msl_fb0.metal -> <function>_dispatch_3
  stem = path.stem.removeprefix(f"{module_name}_")
  match = re.match(r"(.*?_dispatch_\d+)", stem)
  return match.group(1) if match else stem


def _natural(name: str) -> list:
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _read_dumps(dump: pathlib.Path, module_name: str) -> tuple[tuple[str, ...], dict[str, str], dict[str, bytes]]:
  binaries = sorted((dump / "binaries").glob("*"))
  dispatches = tuple(sorted({_dispatch_name(p, module_name) for p in binaries}, key=_natural))
  msl = {_dispatch_name(p, module_name): p.read_text() for p in binaries if p.suffix == ".metal"}
  # Metal keeps the SPIR-V it translated to MSL as an intermediate; Vulkan ships it as the binary.
  spv_files = [*sorted((dump / "intermediates").glob("*.spv")), *(p for p in binaries if p.suffix == ".spv")]
  spirv = {_dispatch_name(p, module_name): p.read_bytes() for p in spv_files}
  return dispatches, msl, spirv


_CONSTANT = re.compile(r"(%[\w$.-]+) = arith\.constant (-?\d+) : (?:i\d+|index)")
_STATIC_LOOP = re.compile(r"scf\.for %[\w$.-]+ = (%[\w$.-]+) to (%[\w$.-]+) step (%[\w$.-]+)")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def _dispatch_calls(flow: str) -> dict[str, int]:
  """Kernel launches per call of each public function, counted in its flow-level code.

  Each ``flow.dispatch`` op counts once, times the trip count of every loop around it
  whose bounds are constants: IREE turns ``nnx.fori_loop``/``nnx.scan`` (and JAX's
  threefry rounds) with static bounds into ``scf.for`` over constants. A loop whose trip
  count is known only at run time (``scf.while``, ``lax.while_loop``) counts its
  dispatches once: for such a function the count is a lower bound. Executables are
  deduplicated across functions (named after the first user), so counting them per
  name would undercount; the calls are what each function launches.
  """
  calls: dict[str, int] = {}
  function, constants, loops, depth = None, {}, [], 0  # loops: (depth inside it, trip count)
  for line in flow.splitlines():
    header = re.match(r"\s*(?:util|func)\.func public @([\w$.]+)\(", line)
    if header:
      function, constants, loops = header.group(1), {}, []
      calls[function] = 0
    code = _STRING.sub('""', line)
    if constant := _CONSTANT.search(code):
      constants[constant.group(1)] = int(constant.group(2))
    if function is not None and "flow.dispatch @" in code:
      calls[function] += math.prod(trips for _, trips in loops)
    depth += code.count("{") - code.count("}")
    if loop := _STATIC_LOOP.search(code):
      low, high, step = (constants.get(name) for name in loop.groups())
      known = None not in (low, high, step) and step > 0
      loops.append((depth, max(0, -(-(high - low) // step)) if known else 1))
    elif "scf.while" in code:
      loops.append((depth, 1))
    while loops and depth < loops[-1][0]:
      loops.pop()
  return calls


def _origins(flow: str) -> dict[str, list[tuple[str, int]]]:
  """The site tags inside each ``flow.executable``: the StableHLO ops each kernel was formed from."""
  starts = [(m.start(), m.group(1)) for m in re.finditer(r"^\s*flow\.executable (?:private )?@([\w$.]+)", flow, re.M)]
  ends = [start for start, _ in starts[1:]] + [len(flow)]
  return {name: site_tags(flow[start:end]) for (start, name), end in zip(starts, ends, strict=True)}


def compile_module(
  mlir: str,
  module_name: str,
  target: Target,
  extra_flags: tuple[str, ...] = (),
  *,
  sites: Mapping[str, tuple[OpSite, ...]] | None = None,
) -> Binary:
  """Runs iree-compile on ``mlir`` (StableHLO, possibly with util globals) for ``target``.

  Args:
    mlir: the module, its ops tagged with their sites (see ``_stablehlo.clean_for_iree``).
    module_name: the module's symbol name (dump files start with it).
    target: what to compile for.
    extra_flags: more iree-compile flags, appended.
    sites: ``{scope: sites}`` of the lowered functions, to name the op behind an error.

  Raises:
    CompileError: iree-compile failed; carries target, flags, diagnostics and the
      StableHLO op and Python line the first error points at.
  """
  flags = list(module_flags(mlir, target, extra_flags))
  sites = sites or {}
  start = time.perf_counter()
  flow = _run(
    _with_device_targets(mlir, target), [*flags, "--compile-to=flow", "--mlir-print-debuginfo"], target, sites
  )
  with tempfile.TemporaryDirectory(prefix="nnx-metal-") as tmp:
    dump = pathlib.Path(tmp)
    dumps = [f"--iree-hal-dump-executable-binaries-to={dump / 'binaries'}"]
    if target.backend == "metal-spirv":
      dumps.append(f"--iree-hal-dump-executable-intermediates-to={dump / 'intermediates'}")
    try:
      vmfb = _run(flow.decode(), [*flags, "--compile-from=flow", *dumps], target, sites)
    except CompileError as error:
      error.kernels = _failing_kernels(flow.decode(), [*flags, "--compile-from=flow"], dump, module_name)
      raise
    seconds = time.perf_counter() - start
    dispatches, msl, spirv = _read_dumps(dump, module_name)
  flow_text = flow.decode()
  return Binary(vmfb, tuple(flags), dispatches, msl, spirv, seconds, _dispatch_calls(flow_text), _origins(flow_text))


def _failing_kernels(
  flow: str, flags: list[str], dump: pathlib.Path, module_name: str
) -> dict[str, list[tuple[str, int]]]:
  """``{kernel: the site tags it was formed from}`` of the kernels that failed to compile.

  iree-compile names the failing kernel only where it dumps the kernels' sources (its
  errors then point into those files), so the failed compile is run once more with
  that dump, which only this diagnosis sees.
  """
  try:
    sources = f"--iree-hal-dump-executable-sources-to={dump / 'sources'}"
    ireec.compile_str(flow, extra_args=[*flags, sources, *_threading_flags()])
  except ireec.CompilerToolError as e:
    named = re.findall(rf"sources/{re.escape(module_name)}_([\w$.]+?)\.mlir:\d+:\d+: error", str(e))
    origins = _origins(flow)
    return {kernel: origins.get(kernel, []) for kernel in dict.fromkeys(named)}
  return {}


def origin_sites(binary: Binary, dispatch: str, sites: Mapping[str, tuple[OpSite, ...]]) -> list[OpSite]:
  """The StableHLO ops ``dispatch`` was formed from (for kernels shared by functions, the first function's)."""
  return [sites[scope][index] for scope, index in binary.origins.get(dispatch, []) if scope in sites]
