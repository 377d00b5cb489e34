"""nnx-metal's compiler: lower NNX models to StableHLO, export them as IREE programs, run them, merge back.

Import as ``import compile as nnxc`` or ``from compile import export, lower``;
never a bare ``import compile`` where the builtin ``compile()`` is needed.

One path: ``lower`` (optional: read the StableHLO) -> ``export`` -> ``Artifact``
(``.save`` / ``Artifact.open``) -> ``Program`` (``artifact.load()``). The
deployment names (``Artifact``, ``Program``, ``load_program``, the errors,
``find_races``) import without JAX (see ``compile.runtime``); the rest imports JAX
on first use.
"""

import importlib

from ._targets import Target as Target
from ._targets import get_target as get_target
from .runtime import TARGET_NAMES as TARGET_NAMES
from .runtime import Artifact as Artifact
from .runtime import ArtifactError as ArtifactError
from .runtime import CompileError as CompileError
from .runtime import DeviceUnavailableError as DeviceUnavailableError
from .runtime import ExecutionError as ExecutionError
from .runtime import HazardError as HazardError
from .runtime import NnxMetalError as NnxMetalError
from .runtime import Program as Program
from .runtime import ProgramFunction as ProgramFunction
from .runtime import SignatureError as SignatureError
from .runtime import StateMismatchError as StateMismatchError
from .runtime import UnknownTargetError as UnknownTargetError
from .runtime import UnsupportedOpError as UnsupportedOpError
from .runtime import load_program as load_program
from .runtime import register_output_type as register_output_type
from .runtime import register_variable_type as register_variable_type
from .spirv import Race as Race
from .spirv import find_races as find_races

# Names that need JAX, imported from their module on first access.
_NEEDS_JAX = {
  "CompileCache": "_cache",
  "Export": "_export",
  "export": "_export",
  "function": "_export",
  "method": "_export",
  "Lowered": "_lower",
  "call_with_objects": "_lower",
  "lower": "_lower",
  "write_report": "_report",
}


def __getattr__(name: str):
  if name in _NEEDS_JAX:
    return getattr(importlib.import_module(f".{_NEEDS_JAX[name]}", __name__), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return [*globals(), *_NEEDS_JAX]
