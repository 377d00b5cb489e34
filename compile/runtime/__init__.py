"""The deployment side of nnx-metal: open a verified artifact and run it. Imports no JAX.

Needs only iree-base-runtime, numpy and ml_dtypes (a machine that only runs
artifacts does not need JAX or the compiler); the few methods that speak
``nnx.State`` import flax when called.
"""

from ._artifact import Artifact as Artifact
from ._manifest import Function as Function
from ._manifest import Manifest as Manifest
from ._manifest import Tensor as Tensor
from ._manifest import Variable as Variable
from ._program import Program as Program
from ._program import ProgramFunction as ProgramFunction
from ._program import load_program as load_program
from ._variables import register_variable_type as register_variable_type
