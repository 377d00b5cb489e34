"""Makes JAX's StableHLO what iree-compile accepts, and checks it against a target before compiling.

JAX 0.10 annotates even single-device programs with sharding: Shardy ``sdy.*``
ops and attributes (a dialect iree-compile does not register), or, with Shardy
off, ``stablehlo.custom_call @Sharding``. On one device these are no-ops, so they
are removed. Any other ``custom_call`` is a kernel IREE does not have.
"""

import dataclasses
import pathlib
import re

import numpy as np
from jax.extend.mlir import ir

from ._targets import Target
from .runtime import UnsupportedOpError

# Custom calls that only annotate sharding: the identity on a single device.
_SHARDING_CALLS = frozenset({"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"})
# jax.export's checks of symbolic dimensions against their constraints: the Program checks the
# declared bounds before every call (compile/runtime/_dims.py), and IREE has no such kernel.
_SHAPE_ASSERTION = "shape_assertion"
# The custom calls by which JAX calls back into Python (jax.debug.print, pure_callback, io_callback).
_HOST_CALLBACKS = ("xla_ffi_python_cpu_callback", "xla_ffi_python_gpu_callback", "xla_python_cpu_callback")
_HOST_CALLBACKS += ("xla_python_gpu_callback", "xla_ffi_partitioned_python_cpu_callback")


@dataclasses.dataclass(frozen=True)
class OpSite:
  """An op of a lowered program and where it came from.

  Attributes:
    op: the op, e.g. ``stablehlo.custom_call @my_kernel`` or ``stablehlo.reduce``.
    frames: the Python ``file:line:col`` it was traced from, innermost first.
    element_types: the element types of its operands and results.
  """

  op: str
  frames: tuple[str, ...]
  element_types: tuple[str, ...]

  @property
  def location(self) -> str:
    return self.frames[0] if self.frames else "an unknown location"

  def describe(self) -> str:
    """``stablehlo.reduce at model.py:12:4 (called from train.py:30:8)``."""
    called = f" (called from {', '.join(self.frames[1:3])})" if len(self.frames) > 1 else ""
    return f"{self.op} at {self.location}{called}"


# Each op's location is tagged with its function and index in the sites, so that
# the kernels IREE forms from it can be traced back (see _iree.py).
SITE_TAG = "nnx@"


def site_tags(text: str) -> list[tuple[str, int]]:
  """The ``(scope, index)`` of every site tag in ``text``, in order of first appearance."""
  found = dict.fromkeys((scope, int(i)) for scope, i in re.findall(rf"{SITE_TAG}([\w.$]+)@(\d+)", text))
  return list(found)


def int_list_attribute(op: ir.Operation, name: str, default: list[int]) -> list[int]:
  """The integers of ``op``'s array or dense-elements attribute ``name``, flattened; ``default`` if absent."""
  if name not in op.attributes:
    return default
  attribute = op.attributes[name]
  if isinstance(attribute, ir.DenseI64ArrayAttr):
    return list(attribute)
  return np.asarray(ir.DenseIntElementsAttr(attribute)).reshape(-1).tolist()


def _element_types(op: ir.Operation) -> tuple[str, ...]:
  types = []
  for value in [*op.operands, *op.results]:
    # Tensor types come back already downcast; scalars (e.g. token) have no element type.
    types.append(str(getattr(value.type, "element_type", value.type)))
  return tuple(types)


def frames(location: ir.Location | str) -> tuple[str, ...]:
  """The ``file:line:col`` frames of a JAX location, innermost first."""
  return tuple(f"{file}:{line}:{column}" for file, line, column in re.findall(r'"([^"]+)":(\d+):(\d+)', str(location)))


_OWN_CODE = str(pathlib.Path(__file__).parent)
_FRAME = re.compile(r'"([^"]*)"\("([^"]+)":(\d+):(\d+)')
_OP_NAME = re.compile(r'^loc\("([^"]*)"\(')


def _traced_location(location: ir.Location) -> ir.Location:
  """``location`` without the frames from nnx-metal's own code outwards.

  JAX records the whole Python stack, down to where ``export`` was called: such
  frames would make the module text (and so the compile cache key and the module's
  bytes) depend on the caller. What remains is the traced code: model, layers, step.
  """
  text = str(location)
  kept = []
  for function, file, line, column in _FRAME.findall(text):
    if file.startswith(_OWN_CODE):
      break
    kept.append(ir.Location.name(function, childLoc=ir.Location.file(file, int(line), int(column))))
  if not kept:
    return ir.Location.unknown()
  traced = ir.Location.callsite(kept[0], kept[1:]) if len(kept) > 1 else kept[0]
  op_name = _OP_NAME.match(text)
  return ir.Location.name(op_name.group(1), childLoc=traced) if op_name else traced


def _op_label(op: ir.Operation) -> str:
  if op.name == "stablehlo.custom_call":
    return f"stablehlo.custom_call @{ir.StringAttr(op.attributes['call_target_name']).value}"
  return op.name


def _is_sharding_noop(op: ir.Operation) -> bool:
  if op.name == "sdy.sharding_constraint":
    return True
  return op.name == "stablehlo.custom_call" and (
    ir.StringAttr(op.attributes["call_target_name"]).value in (*_SHARDING_CALLS, _SHAPE_ASSERTION)
  )


def _strip_dict_attr(attr: ir.Attribute) -> ir.Attribute:
  attr = ir.DictAttr(attr)
  named = [attr[i] for i in range(len(attr))]
  entries = {n.name: n.attr for n in named if not n.name.startswith("sdy.")}
  return ir.DictAttr.get(entries)


def _strip_sdy_attributes(op: ir.Operation) -> None:
  for name in list(op.attributes):
    if name.startswith("sdy."):
      del op.attributes[name]
  for list_name in ("arg_attrs", "res_attrs"):
    if list_name in op.attributes:
      attrs = ir.ArrayAttr(op.attributes[list_name])
      op.attributes[list_name] = ir.ArrayAttr.get([_strip_dict_attr(a) for a in attrs])


def clean_for_iree(module: ir.Module, scope: str = "main") -> tuple[OpSite, ...]:
  """Removes single-device sharding annotations and tags every op with its site; returns the sites.

  Op ``i`` is tagged ``nnx@<scope>@<i>`` (see :func:`site_tags`). ``module`` is modified in place.
  """
  noops, sites = [], []

  def visit(op: ir.Operation) -> ir.WalkResult:
    op = op.operation if hasattr(op, "operation") else op
    if op.name == "sdy.mesh" or _is_sharding_noop(op):
      noops.append(op)
    elif op.name in ("builtin.module", "func.func"):
      # Their locations hold the Python call stack of export's caller: dropped, so the
      # same program compiles to the same bytes (and hits the cache) from any call site.
      op.location = ir.Location.unknown()
    else:
      op.location = ir.Location.name(f"{SITE_TAG}{scope}@{len(sites)}", childLoc=_traced_location(op.location))
      sites.append(OpSite(_op_label(op), frames(op.location), _element_types(op)))
    _strip_sdy_attributes(op)
    return ir.WalkResult.ADVANCE

  with module.context:
    module.operation.walk(visit)
    for op in noops:
      if op.results:  # a shape assertion has none
        op.results[0].replace_all_uses_with(op.operands[0])
      op.erase()
  return tuple(sites)


# What ``without_locations`` steps through: strings (skipped whole, so a "loc(" inside one is text), location
# openings and parentheses.
_LOCATION_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|\bloc\(|[()]')


def without_locations(mlir: str) -> str:
  """``mlir`` (as :func:`module_text` prints it) without its inline ``loc(...)`` attributes: the code alone.

  JAX traces a jitted helper (the threefry hash behind every Dropout, for one) once per
  process and reuses it, with the Python frames of whichever model called it first, so
  the same program's locations depend on what the process traced before.
  """
  pieces, kept_from, depth = [], 0, 0  # depth > 0: inside a loc(...)
  for token in _LOCATION_TOKENS.finditer(mlir):
    text = token.group()
    if depth == 0:
      if text == "loc(":
        pieces.append(mlir[kept_from : token.start()])
        depth = 1
    elif text == ")":
      depth -= 1
      if depth == 0:
        kept_from = token.end()
    elif text[0] != '"':
      depth += 1
  pieces.append(mlir[kept_from:])
  return "".join(pieces)


def module_text(module: ir.Module | ir.Operation) -> str:
  """The text iree-compile gets: with every op's location inline, so its errors point at Python lines."""
  operation = module.operation if hasattr(module, "operation") else module
  return operation.get_asm(enable_debug_info=True, use_local_scope=True)


def check_target_support(sites: tuple[OpSite, ...], target: Target) -> None:
  """Raises UnsupportedOpError for the first op ``target`` cannot compile.

  Checks custom calls (kernels IREE does not have) and element types the target
  lacks, so that the user sees the op and its source line instead of an
  iree-compile legalization failure.
  """
  for site in sites:
    if any(site.op.endswith(f"@{call}") for call in _HOST_CALLBACKS):
      raise UnsupportedOpError(
        f"`{site.describe()}` is a host callback (jax.debug.print, jax.debug.callback, jax.pure_callback or "
        "io_callback): a compiled program runs on the device with no Python to call back. Remove it from the "
        f"exported function (print the outputs instead), or run the function eagerly to debug it."
      )
    if site.op.startswith("stablehlo.custom_call"):
      raise UnsupportedOpError(
        f"`{site.describe()}` cannot be compiled for target {target.name!r}: "
        "IREE has no implementation of this custom call. Replace the function that "
        "emits it (a jax.ffi call or a backend-specific kernel) with jax.numpy/lax ops."
      )
    for element_type in site.element_types:
      for prefix, why in target.unsupported_types:
        if re.fullmatch(rf"{prefix}\b.*", element_type):
          raise UnsupportedOpError(
            f"`{site.describe()}` uses element type {element_type}, which target {target.name!r} cannot compile: {why}."
          )


def embeddable_functions(module: ir.Module, *, prefix: str) -> str:
  """The module's functions as text to paste into another module: private, renamed ``<prefix>.<name>``.

  Renaming keeps the helpers of several JAX modules (each has ``@main``, and often
  ``@relu`` or ``@_where``) apart once they share one module. ``module`` is modified in place.
  """
  with module.context:
    functions = list(module.body.operations)
    for op in functions:
      name = ir.StringAttr(op.attributes["sym_name"]).value
      ir.SymbolTable.replace_all_symbol_uses(name, f"{prefix}.{name}", module.operation)
      ir.SymbolTable.set_symbol_name(op, f"{prefix}.{name}")
      ir.SymbolTable.set_visibility(op, "private")
    return "\n".join(module_text(op) for op in functions)
