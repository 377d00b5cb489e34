"""nnx-metal's compiler: lower an NNX model to StableHLO, build it with IREE, run it, merge back.

Import as ``import compile as nnxc`` or ``from compile import lower, build, load``;
never a bare ``import compile`` where the builtin ``compile()`` is needed.
"""

from ._build import Compiled as Compiled
from ._build import build as build
from ._errors import ArtifactError as ArtifactError
from ._errors import CompileError as CompileError
from ._errors import DeviceUnavailableError as DeviceUnavailableError
from ._errors import NnxMetalError as NnxMetalError
from ._errors import SignatureError as SignatureError
from ._errors import StateMismatchError as StateMismatchError
from ._errors import UnknownTargetError as UnknownTargetError
from ._errors import UnsupportedOpError as UnsupportedOpError
from ._layout import Leaf as Leaf
from ._layout import StateLayout as StateLayout
from ._lower import Lowered as Lowered
from ._lower import lower as lower
from ._run import Executable as Executable
from ._run import Session as Session
from ._run import load as load
from ._targets import TARGET_NAMES as TARGET_NAMES
from ._targets import Target as Target
from ._targets import get_target as get_target
