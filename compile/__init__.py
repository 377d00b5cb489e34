"""nnx-metal's compiler: lower NNX models to StableHLO, build them with IREE, run them, merge back.

Import as ``import compile as nnxc`` or ``from compile import export, lower, build``;
never a bare ``import compile`` where the builtin ``compile()`` is needed.

The deployment names (``Artifact``, ``Program``, ``load_program`` and the errors)
import without JAX; the rest imports JAX on first use, so a machine with only
iree-base-runtime and numpy can load and run artifacts.
"""

import importlib

from ._artifact import Artifact as Artifact
from ._errors import ArtifactError as ArtifactError
from ._errors import CompileError as CompileError
from ._errors import DeviceUnavailableError as DeviceUnavailableError
from ._errors import NnxMetalError as NnxMetalError
from ._errors import SignatureError as SignatureError
from ._errors import StateMismatchError as StateMismatchError
from ._errors import UnknownTargetError as UnknownTargetError
from ._errors import UnsupportedOpError as UnsupportedOpError
from ._program import Program as Program
from ._program import load_program as load_program
from ._targets import TARGET_NAMES as TARGET_NAMES
from ._targets import Target as Target
from ._targets import get_target as get_target

# Names that need JAX, imported from their module on first access.
_NEEDS_JAX = {
  "Binary": "_build",
  "Compiled": "_build",
  "build": "_build",
  "CompileCache": "_cache",
  "Function": "_export",
  "export": "_export",
  "function": "_export",
  "method": "_export",
  "Leaf": "_layout",
  "StateLayout": "_layout",
  "Lowered": "_lower",
  "lower": "_lower",
  "write_report": "_report",
  "Executable": "_run",
  "Session": "_run",
  "load": "_run",
}


def __getattr__(name: str):
  if name in _NEEDS_JAX:
    return getattr(importlib.import_module(f".{_NEEDS_JAX[name]}", __name__), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return [*globals(), *_NEEDS_JAX]
