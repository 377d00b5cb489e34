"""The deployment side of nnx-metal: open a verified artifact and run it. Imports no JAX.

Needs only iree-base-runtime, numpy and ml_dtypes (a machine that only runs
artifacts does not need JAX or the compiler); the few methods that speak
``nnx.State`` import flax when called. This package is the ground floor: it imports
nothing from the rest of ``compile``, and the compiler uses only the names below.
"""

from ._artifact import Artifact as Artifact
from ._artifact import load_program as load_program
from ._artifact import package_version as package_version
from ._artifact import sha256 as sha256
from ._buckets import bucket_groups as bucket_groups
from ._buckets import bucket_name as bucket_name
from ._device import DeviceModule as DeviceModule
from ._device import open_device as open_device
from ._dims import Dim as Dim
from ._dtypes import device_dtype_name as device_dtype_name
from ._errors import ArtifactError as ArtifactError
from ._errors import CompileError as CompileError
from ._errors import DeviceUnavailableError as DeviceUnavailableError
from ._errors import ExecutionError as ExecutionError
from ._errors import HazardError as HazardError
from ._errors import NnxMetalError as NnxMetalError
from ._errors import SignatureError as SignatureError
from ._errors import StateMismatchError as StateMismatchError
from ._errors import UnknownTargetError as UnknownTargetError
from ._errors import UnsupportedOpError as UnsupportedOpError
from ._file_names import KERNEL_FOLDERS as KERNEL_FOLDERS
from ._file_names import MANIFEST as MANIFEST
from ._file_names import MLIR as MLIR
from ._file_names import MODULE as MODULE
from ._file_names import PARAMS as PARAMS
from ._file_names import is_safe_file_name as is_safe_file_name
from ._file_names import kernel_file as kernel_file
from ._interface import GET_STATE as GET_STATE
from ._interface import INTERFACE as INTERFACE
from ._interface import PARAMETER_SCOPE as PARAMETER_SCOPE
from ._interface import SET_STATE as SET_STATE
from ._interface import STATE_ORDER as STATE_ORDER
from ._interface import function_name_problem as function_name_problem
from ._interface import global_names as global_names
from ._interface import interface as interface
from ._interface import path_name as path_name
from ._interface import written_names as written_names
from ._manifest import Manifest as Manifest
from ._program import Program as Program
from ._program import ProgramFunction as ProgramFunction
from ._pytrees import register_output_type as register_output_type
from ._pytrees import unflatten_outputs as unflatten_outputs
from ._records import Function as Function
from ._records import Tensor as Tensor
from ._records import Variable as Variable
from ._targets import CPU_KERNEL_STACK as CPU_KERNEL_STACK
from ._targets import RUNTIME_TARGETS as RUNTIME_TARGETS
from ._targets import STANDIN_SUBGROUP_SIZE as STANDIN_SUBGROUP_SIZE
from ._targets import TARGET_NAMES as TARGET_NAMES
from ._targets import RuntimeTarget as RuntimeTarget
from ._variables import PLAIN_ARRAY as PLAIN_ARRAY
from ._variables import class_path as class_path
from ._variables import known_variable_class as known_variable_class
from ._variables import register_variable_type as register_variable_type
from ._variables import user_metadata as user_metadata
