"""Assembling a program: one IREE module where the state lives in globals and each function updates them.

Every state leaf becomes a ``util.global`` initialized from the parameter archive
(``#flow.parameter.named<"model"::"<name>">``), so the state is loaded once and stays
on the device. Each exported function becomes a wrapper that loads the globals, calls
the JAX-lowered body, stores the leaves that body changed, and returns only the body's
outputs. ``nnx_get_state`` reads every global, for moving state to the host;
``nnx_set_state`` writes the written ones (below).

On cpu, a leaf that no function writes (the weights of an inference or generation
program) is an immutable global (``RuntimeTarget.constant_state`` says where): IREE
then computes what depends only on it (a transposed embedding table, the re-packed
tiles of every weight matrix) once, when the module loads, instead of in every call.
A caller that replaces such a leaf loads the module again with the new values
(``compile/runtime/_program.py``, ``nnx_metal.c``).
"""

import re

from ._lower import Lowered
from .runtime import GET_STATE, INTERFACE, PARAMETER_SCOPE, SET_STATE, STATE_ORDER


def _signless(tensor_type: str) -> str:
  # The StableHLO input conversion makes function types signless but not util ops:
  # unsigned globals are declared signless and bitcast at each load and store.
  return re.sub(r"([<x])ui(\d+)>$", r"\1i\2>", tensor_type)


def _zero_literal(tensor_type: str) -> str:
  element = re.search(r"[<x]([a-z]\w*)>$", tensor_type).group(1)
  if element == "i1":
    return "false"
  return "0.0" if element.startswith(("f", "bf")) else "0"


class _Function:
  """Writes one wrapper function's body, numbering its SSA values."""

  def __init__(self, globals_: list[str], state_types: tuple[str, ...]):
    self.globals, self.types, self.lines, self._count = globals_, state_types, [], 0

  def value(self) -> str:
    self._count += 1
    return f"%v{self._count}"

  def flag_is_set(self) -> str:
    """``%flag != 0`` for the function's ``%flag: tensor<i32>`` argument (callers pass 1)."""
    zero, true = self.value(), self.value()
    self.lines.append(f"{zero} = stablehlo.constant dense<0> : tensor<i32>")
    self.lines.append(f"{true} = stablehlo.compare NE, %flag, {zero} : (tensor<i32>, tensor<i32>) -> tensor<i1>")
    return true

  def fresh(self, value: str, stored: str, true: str) -> str:
    """``value`` written by a dispatch into a buffer of its own.

    A select on a predicate known only at run time cannot be folded away. Without
    it, nnx_get_state hands out views into IREE's packed global storage and
    nnx_set_state stores the caller's buffers, and on Vulkan (lavapipe) both went
    wrong: reads came back from the wrong offsets, and dispatches read NaNs from
    globals set that way. Values written by dispatches, as after a train step, work.
    """
    zero, fresh = self.value(), self.value()
    self.lines.append(f"{zero} = stablehlo.constant dense<{_zero_literal(stored)}> : {stored}")
    self.lines.append(f"{fresh} = stablehlo.select {true}, {value}, {zero} : tensor<i1>, {stored}")
    return fresh

  def load(self, index: int, *, fresh_if: str | None = None) -> str:
    stored, typed = _signless(self.types[index]), self.types[index]
    value = self.value()
    self.lines.append(f'{value} = util.global.load @"{self.globals[index]}" : {stored}')
    if fresh_if is not None:
      value = self.fresh(value, stored, fresh_if)
    if stored != typed:
      cast = self.value()
      self.lines.append(f"{cast} = stablehlo.bitcast_convert {value} : ({stored}) -> {typed}")
      value = cast
    return value

  def store(self, value: str, index: int, *, fresh_if: str | None = None) -> None:
    stored, typed = _signless(self.types[index]), self.types[index]
    if stored != typed:
      cast = self.value()
      self.lines.append(f"{cast} = stablehlo.bitcast_convert {value} : ({typed}) -> {stored}")
      value = cast
    if fresh_if is not None:
      value = self.fresh(value, stored, fresh_if)
    self.lines.append(f'util.global.store {value}, @"{self.globals[index]}" : {stored}')

  def text(
    self, name: str, args: list[str], arg_types: list[str], returns: list[str], return_types: list[str], attributes=""
  ) -> str:
    params = ", ".join(f"{a}: {t}" for a, t in zip(args, arg_types, strict=True))
    ret = f"return {', '.join(returns)} : {', '.join(return_types)}" if returns else "return"
    body = "\n".join(f"    {line}" for line in [*self.lines, ret])
    header = f"func.func @{name}({params}) -> ({', '.join(return_types)}){attributes}"
    return f"  {header} {{\n{body}\n  }}"


def _call(name: str, lowered: Lowered, globals_: list[str]) -> str:
  f = _Function(globals_, lowered.state_types)
  state = [f.load(i) for i in range(len(globals_))]
  args = [f"%arg{i}" for i in range(len(lowered.arg_types))]
  num_results = len(lowered.output_types) + len(lowered.updates)
  result_types = [*lowered.output_types, *(lowered.state_types[i] for i in lowered.updates)]
  operand_types = ", ".join([*lowered.state_types, *lowered.arg_types])
  call = f'func.call @"{name}.main"({", ".join([*state, *args])}) : ({operand_types}) -> ({", ".join(result_types)})'
  if num_results == 0:
    f.lines.append(call)
    results = []
  elif num_results == 1:
    f.lines.append(f"%r = {call}")
    results = ["%r"]
  else:
    f.lines.append(f"%r:{num_results} = {call}")
    results = [f"%r#{i}" for i in range(num_results)]
  num_outputs = len(lowered.output_types)
  for index, value in zip(lowered.updates, results[num_outputs:], strict=True):
    f.store(value, index)
  return f.text(name, args, list(lowered.arg_types), results[:num_outputs], list(lowered.output_types))


def _string_attribute(text: str) -> str:
  """``text`` as an MLIR string literal (ASCII in, backslash and quote escaped as hex)."""
  return '"' + text.replace("\\", "\\5C").replace('"', "\\22") + '"'


def _state_accessors(
  globals_: list[str], state_types: tuple[str, ...], written: list[int], interface: str
) -> list[str]:
  """``nnx_get_state(%flag)`` returns every global; ``nnx_set_state(%flag, *values)`` replaces the ``written`` ones."""
  getter = _Function(globals_, state_types)
  true = getter.flag_is_set()
  values = [getter.load(i, fresh_if=true) for i in range(len(globals_))]
  setter = _Function(globals_, state_types)
  true = setter.flag_is_set()
  args = [f"%arg{i}" for i in range(len(written))]
  for i, arg in zip(written, args, strict=True):
    setter.store(arg, i, fresh_if=true)
  # The order of the globals and the interface, readable from the module itself: artifacts check
  # their manifest against them (see compile/runtime/_artifact.py).
  reflection = f'"{STATE_ORDER}" = "{",".join(globals_)}", "{INTERFACE}" = {_string_attribute(interface)}'
  order = f" attributes {{iree.reflection = {{{reflection}}}}}"
  return [
    getter.text(GET_STATE, ["%flag"], ["tensor<i32>"], values, list(state_types), order),
    setter.text(SET_STATE, ["%flag", *args], ["tensor<i32>", *(state_types[i] for i in written)], [], []),
  ]


def assemble(
  module_name: str, functions: dict[str, Lowered], globals_: list[str], interface: str, *, written: list[int]
) -> str:
  """The program's MLIR: globals for the state, one public function per entry of ``functions``.

  All ``functions`` must be lowered from the same objects (one State layout).
  ``interface`` (``runtime._manifest.interface``) is recorded in the module. ``written``
  (``runtime.written_names``): indices of the mutable globals, the ones ``nnx_set_state`` takes;
  the others are immutable.
  """
  first = next(iter(functions.values()))
  lines = [f"module @{module_name} {{"]
  for index, (name, state_type) in enumerate(zip(globals_, first.state_types, strict=True)):
    parameter = f'#flow.parameter.named<"{PARAMETER_SCOPE}"::"{name}">'
    mutable = " mutable" if index in written else ""
    lines.append(f'  util.global private{mutable} @"{name}" = {parameter} : {_signless(state_type)}')
  lines += [_call(name, lowered, globals_) for name, lowered in functions.items()]
  lines += _state_accessors(globals_, first.state_types, written, interface)
  lines += [lowered.functions for lowered in functions.values()]
  lines.append("}")
  return "\n".join(lines) + "\n"
