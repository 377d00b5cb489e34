"""Checks that a manifest describes the module it ships with: the module itself is the reference.

An IREE module (``.vmfb``) declares each exported function's signature, and nnx-metal's
modules record in ``nnx_get_state``'s reflection the order of the state globals and
the program's interface (``_interface.interface``). A manifest that disagrees with any
of them, or a module whose kernels are for another device, is refused: editing the
manifest cannot change what a caller gets.
"""

import re

from iree import runtime as rt

from . import _dtypes
from ._errors import ArtifactError
from ._file_names import MANIFEST, MODULE
from ._interface import GET_STATE, INTERFACE, SET_STATE, STATE_ORDER
from ._manifest import Manifest
from ._records import Tensor

_DECLARATION = re.compile(r"sync func @([\w$.]+)\((.*)\) -> \((.*)\)")
_ARGUMENT = re.compile(
  r"%\w+: (tensor<(?:[^<>]|<[^<>]*>)*>)(?: \{iree\.abi\.encoding = (tensor<(?:[^<>]|<[^<>]*>)*>)\})?"
)


def tensor_type(tensor: Tensor) -> str:
  """``tensor.device_dtype[tensor.shape]`` as an MLIR tensor type, signedness included (``tensor<2xui32>``)."""
  return f"tensor<{''.join(f'{d}x' for d in tensor.shape)}{_dtypes.dtype(tensor.device_dtype).mlir}>"


def _declared(text: str) -> list[str]:
  # Unsigned values are declared signless, with their type as an encoding: "%x: tensor<i32> {iree.abi.encoding =
  # tensor<ui32>}". The encoding is the type.
  return [encoding or plain for plain, encoding in _ARGUMENT.findall(text)]


def _check_declaration(module: rt.VmModule, name: str, inputs: list[str], outputs: list[str]) -> None:
  function = module.lookup_function(name)
  if function is None:
    raise ArtifactError(f"{MODULE} has no function {name!r}, which {MANIFEST} lists. Export the artifact again.")
  declaration = function.reflection.get("iree.abi.declaration", "")
  match = _DECLARATION.fullmatch(declaration)
  if match is None or (_declared(match.group(2)), _declared(match.group(3))) != (inputs, outputs):
    raise ArtifactError(
      f"{MANIFEST} describes {name} as ({', '.join(inputs)}) -> ({', '.join(outputs)}), but {MODULE} declares "
      f"{declaration[:300] or 'no signature'}. The files do not belong together; export the artifact again."
    )


def _check(vmfb: bytes, manifest: Manifest) -> None:
  kernels = manifest.target.kernel_format.encode()
  if kernels not in vmfb:
    raise ArtifactError(
      f"{MODULE} holds no {kernels.decode()} kernels, which a {manifest.target.name!r} module has: it was "
      "compiled for another device. Export the artifact again."
    )
  module = rt.VmModule.copy_buffer(rt.VmInstance(), vmfb)
  for function in manifest.functions.values():
    inputs, outputs = [tensor_type(t) for t in function.inputs], [tensor_type(t) for t in function.outputs]
    _check_declaration(module, function.name, inputs, outputs)
  state = [tensor_type(v) for v in manifest.state]
  _check_declaration(module, GET_STATE, ["tensor<i32>"], state)
  _check_declaration(module, SET_STATE, ["tensor<i32>", *(tensor_type(v) for v in manifest.written())], [])
  reflection = module.lookup_function(GET_STATE).reflection
  if reflection.get(STATE_ORDER) != ",".join(v.global_name for v in manifest.state):
    raise ArtifactError(
      f"{MANIFEST} lists the state in another order than {MODULE} holds it: entries were swapped or edited. "
      "Export the artifact again."
    )
  if reflection.get(INTERFACE) != manifest.interface():
    raise ArtifactError(
      f"{MANIFEST} describes the state or the functions otherwise than {MODULE} records them (a variable's type, "
      "path or key, a function's inputs, outputs or their order): it was edited. Export the artifact again."
    )
  unexpected = set(module.function_names) - {"__init", GET_STATE, SET_STATE, *manifest.functions}
  if unexpected:
    raise ArtifactError(f"{MODULE} exports {sorted(unexpected)}, which {MANIFEST} does not list. Export again.")


def check_module(vmfb: bytes, manifest: Manifest) -> None:
  """Checks ``manifest`` against the kernels, signatures, state order and interface ``vmfb`` declares.

  Raises:
    ArtifactError: they disagree, or ``vmfb`` is no module this runtime reads (the message says which).
  """
  try:
    _check(vmfb, manifest)
  except ArtifactError:
    raise
  except Exception as e:  # noqa: BLE001 - a native parser reading hostile bytes: whatever it raises, refuse
    raise ArtifactError(f"{MODULE} is not a module this runtime can read ({type(e).__name__}: {e}).") from None
