"""The exceptions nnx-metal raises. Each message says what was expected, what was got, and how to fix it."""


class NnxMetalError(Exception):
  """Base class of every error nnx-metal raises on purpose."""


class UnknownTargetError(NnxMetalError, ValueError):
  """A target or runtime device name that nnx-metal does not know."""


class SignatureError(NnxMetalError, ValueError):
  """An input whose shape or dtype does not match the compiled function's signature."""


class StateMismatchError(NnxMetalError, ValueError):
  """A State whose structure, shapes or dtypes do not match the compiled GraphDef."""


class UnsupportedOpError(NnxMetalError):
  """The lowered program holds an op or type the IREE target cannot compile."""


class CompileError(NnxMetalError):
  """iree-compile failed; carries the target, the flags, the compiler's diagnostics and the op they point at.

  Attributes:
    target: the target's name.
    flags: the iree-compile flags.
    diagnostics: what iree-compile printed.
    culprit: the first error and the StableHLO op and Python line it points at ("" if unknown).
    kernels: ``{kernel: [(function, site index), ...]}``: the kernels that failed and the
      StableHLO ops they were formed from, where iree-compile got that far (else empty).
  """

  def __init__(self, target: str, flags: list[str], diagnostics: str, *, culprit: str = ""):
    self.target, self.flags, self.diagnostics, self.culprit = target, flags, diagnostics, culprit
    self.kernels: dict[str, list[tuple[str, int]]] = {}
    super().__init__(
      f"iree-compile failed for target {target!r}: {culprit or 'see the diagnostics below'}"
      f"\nflags: {' '.join(flags)}\ndiagnostics:\n{diagnostics.strip()}"
    )


class DeviceUnavailableError(NnxMetalError, RuntimeError):
  """The runtime driver a compiled module needs is not present on this machine."""


class ArtifactError(NnxMetalError):
  """An artifact on disk that is corrupt, truncated or made for something else."""


class ExecutionError(NnxMetalError, RuntimeError):
  """The device failed to run a compiled function (the IREE runtime's error is in the message)."""


class HazardError(NnxMetalError):
  """A compiled SPIR-V kernel may read memory another invocation wrote, with no barrier in between (a data race).

  Attributes:
    target: the target's name.
    kernels: ``{kernel: descriptions of its races}``.
  """

  def __init__(self, target: str, report: str, kernels: dict[str, list[str]]):
    self.target, self.kernels = target, kernels
    super().__init__(report)
