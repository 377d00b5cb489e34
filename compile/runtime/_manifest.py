"""``manifest.json``: what an artifact holds, as typed frozen records parsed and validated in one place.

Everything that reads a manifest reads it through :meth:`Manifest.from_json`, which
checks every field (type, range, cross-references), refuses unknown fields and
names the field in every error. Nothing in a manifest is ever imported or called:
class names are descriptions, resolved only against types the process already knows
(see ``_variables.py``).
"""

import dataclasses
import json
import math
import re
from collections.abc import Callable
from typing import Any

from .._errors import ArtifactError
from .._targets import RUNTIME
from . import _dtypes

FORMAT = "nnx-metal-artifact"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
MODULE = "module.vmfb"
PARAMS = "params.irpa"
MLIR = "module.mlir"
MAX_MANIFEST_BYTES = 64 << 20

# The module's own functions that read and write every state global (see compile/_assemble.py).
GET_STATE = "nnx_get_state"
SET_STATE = "nnx_set_state"

HAZARD_CHECKS = ("passed", "off", "not applicable")
KEY_WORDS = {"threefry2x32": 2, "rbg": 4, "unsafe_rbg": 4}  # uint32 words per PRNG key
KEY_IMPLS = tuple(KEY_WORDS)
# Program attributes: an exported function may not be called like one of them.
RESERVED_NAMES = frozenset(
  {"artifact", "driver", "functions", "state", "arrays", "set_arrays", "load_state", "update", "save", "functional"}
)

_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_GLOBAL = re.compile(r"[A-Za-z0-9_.$-]+")
_DISPATCH = re.compile(r"[A-Za-z0-9_]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_DIMENSION = 1 << 40
_MAX_DEPTH = 32


def path_name(path: tuple) -> str:
  """A state variable's name: its NNX path joined with dots (``linear1.w``, ``layers.0.b``)."""
  return ".".join(str(part) for part in path)


def global_names(names: list[str]) -> list[str]:
  """A unique, MLIR-safe global (and parameter key) name per state variable, readable as its NNX path."""
  result, seen = [], set()
  for name in names:
    safe = re.sub(r"[^A-Za-z0-9_.$-]", "_", name)
    while safe in seen:
      safe += "_"
    seen.add(safe)
    result.append(safe)
  return result


def _fail(where: str, problem: str) -> ArtifactError:
  return ArtifactError(f"{MANIFEST}: {where} {problem}. The artifact is corrupt or was edited; export it again.")


class _Fields:
  """One JSON object read field by field; every error names the field; unread fields are refused."""

  def __init__(self, value: Any, where: str):
    if not isinstance(value, dict):
      raise _fail(where, f"must be an object, not {type(value).__name__}")
    self.value, self.where, self._read = value, where, set()

  def get(self, key: str, check: Callable[[Any, str], Any]) -> Any:
    self._read.add(key)
    where = f"{self.where}.{key}" if self.where else key
    if key not in self.value:
      raise _fail(where, "is missing")
    return check(self.value[key], where)

  def done(self) -> None:
    unknown = sorted(set(self.value) - self._read)
    if unknown:
      raise _fail(self.where or "the top level", f"has unknown field(s) {', '.join(map(repr, unknown[:5]))}")


# Checks: each takes the JSON value and where it is, and returns the Python value or raises.


def _text(value: Any, where: str, *, pattern: re.Pattern | None = None, limit: int = 4096) -> str:
  if not isinstance(value, str) or len(value) > limit:
    raise _fail(where, f"must be a string of at most {limit} characters")
  if pattern is not None and not pattern.fullmatch(value):
    raise _fail(where, f"is {value[:80]!r}, which is not of the form {pattern.pattern}")
  return value


def _matching(pattern: re.Pattern) -> Callable[[Any, str], str]:
  return lambda value, where: _text(value, where, pattern=pattern)


def _one_of(choices) -> Callable[[Any, str], Any]:
  """Exactly one of ``choices``, of the same type: 1 is not True, 2.0 is not 2, a list is no name."""

  def check(value, where):
    if not any(type(value) is type(choice) and value == choice for choice in choices):
      raise _fail(where, f"is {str(value)[:80]!r}; expected one of {', '.join(map(repr, choices))}")
    return value

  return check


def _optional(check: Callable) -> Callable[[Any, str], Any]:
  return lambda value, where: None if value is None else check(value, where)


def _integer(value: Any, where: str, *, low: int = 0, high: int = _MAX_DIMENSION) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
    raise _fail(where, f"must be an integer in [{low}, {high}]")
  return value


def _number(value: Any, where: str) -> float:
  if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
    raise _fail(where, "must be a finite number >= 0")
  return float(value)


def _list(item: Callable[[Any, str], Any], *, limit: int = 1 << 20) -> Callable[[Any, str], tuple]:
  def check(value, where):
    if not isinstance(value, list) or len(value) > limit:
      raise _fail(where, f"must be a list of at most {limit} items")
    return tuple(item(v, f"{where}[{i}]") for i, v in enumerate(value))

  return check


def _mapping(key: Callable, item: Callable[[Any, str], Any]) -> Callable[[Any, str], dict]:
  def check(value, where):
    if not isinstance(value, dict):
      raise _fail(where, "must be an object")
    return {key(k, f"{where} key"): item(v, f"{where}.{k}") for k, v in value.items()}

  return check


def _scalar(value: Any, where: str) -> str | int | float | bool:
  if isinstance(value, str | bool | int) or (isinstance(value, float) and math.isfinite(value)):
    return value
  raise _fail(where, "must be a string, number or boolean")


def _path_part(value: Any, where: str) -> str | int:
  if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
    return value
  return _text(value, where, limit=256)


@dataclasses.dataclass(frozen=True)
class Tensor:
  """An array at a function's boundary: an input (``args[0]``) or an output (``outputs[0]``).

  Attributes:
    name: what the user calls it.
    shape: its shape.
    dtype: the numpy dtype name the user passes and gets.
    device_dtype: the dtype on the device (float64 becomes float32 on metal and vulkan).
  """

  name: str
  shape: tuple[int, ...]
  dtype: str
  device_dtype: str

  def describe(self) -> str:
    return f"{self.name}: {self.dtype}{list(self.shape)}"

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  def to_json(self) -> dict[str, Any]:
    return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "device_dtype": self.device_dtype}


def _tensor_fields(fields: _Fields, demote_f64: bool) -> dict[str, Any]:
  dtype = fields.get("dtype", _one_of(tuple(_dtypes.DTYPES)))
  device_dtype = fields.get("device_dtype", _one_of((_dtypes.device_dtype_name(dtype, demote_f64),)))
  shape = fields.get("shape", _list(_integer, limit=64))
  return {"name": fields.get("name", _text), "shape": shape, "dtype": dtype, "device_dtype": device_dtype}


def _tensor(demote_f64: bool) -> Callable[[Any, str], Tensor]:
  def check(value, where):
    fields = _Fields(value, where)
    tensor = Tensor(**_tensor_fields(fields, demote_f64))
    fields.done()
    return tensor

  return check


@dataclasses.dataclass(frozen=True)
class Variable(Tensor):
  """One state variable of the exported objects.

  Attributes:
    path: its NNX path (``("linear1", "w")``); ``name`` is the path joined with dots.
    variable_type: its ``nnx.Variable`` subclass's name (``Param``, ``BatchStat``).
    variable_class: ``module:qualname`` of that class: a description, never imported.
    global_name: its IREE global and parameter-archive key.
    metadata: the Variable's scalar metadata.
    key_impl: the PRNG implementation of a typed key (held as its key data), else None.
  """

  path: tuple[str | int, ...] = ()
  variable_type: str = ""
  variable_class: str = ""
  global_name: str = ""
  metadata: dict[str, str | int | float | bool] = dataclasses.field(default_factory=dict)
  key_impl: str | None = None

  def describe(self) -> str:
    return f"{self.name} ({self.variable_type}): {self.dtype}{list(self.shape)}"

  def to_json(self) -> dict[str, Any]:
    return {
      **super().to_json(),
      "path": list(self.path),
      "variable_type": self.variable_type,
      "variable_class": self.variable_class,
      "global": self.global_name,
      "metadata": dict(self.metadata),
      "key_impl": self.key_impl,
    }


def _variable(demote_f64: bool) -> Callable[[Any, str], Variable]:
  def check(value, where):
    fields = _Fields(value, where)
    variable = Variable(
      **_tensor_fields(fields, demote_f64),
      path=fields.get("path", _list(_path_part, limit=256)),
      variable_type=fields.get("variable_type", _matching(_IDENTIFIER)),
      variable_class=fields.get("variable_class", _text),
      global_name=fields.get("global", _matching(_GLOBAL)),
      metadata=fields.get("metadata", _mapping(_matching(_IDENTIFIER), _scalar)),
      key_impl=fields.get("key_impl", _optional(_one_of(KEY_IMPLS))),
    )
    fields.done()
    if variable.name != path_name(variable.path):
      raise _fail(f"{where}.name", f"is {variable.name!r} but its path joins to {path_name(variable.path)!r}")
    if variable.key_impl is not None and (variable.dtype, variable.shape[-1:]) != (
      "uint32",
      (KEY_WORDS[variable.key_impl],),
    ):
      raise _fail(f"{where}.key_impl", f"{variable.key_impl!r} holds uint32[..., {KEY_WORDS[variable.key_impl]}] keys")
    return variable

  return check


def _structure(value: Any, where: str, depth: int = 0) -> dict[str, Any]:
  """A return value's shape: ``{"leaf": i}``, ``{"none": null}``, ``{"tuple"|"list": [...]}`` or ``{"dict": [...]}``."""
  if depth > _MAX_DEPTH or not isinstance(value, dict) or len(value) != 1:
    raise _fail(where, "must be one of {leaf}, {none}, {tuple}, {list}, {dict}, nested at most 32 deep")
  ((kind, content),) = value.items()
  if kind == "leaf":
    return {"leaf": _integer(content, f"{where}.leaf")}
  if kind == "none" and content is None:
    return {"none": None}
  if kind in ("tuple", "list"):
    items = _list(lambda v, w: _structure(v, w, depth + 1), limit=1 << 16)(content, f"{where}.{kind}")
    return {kind: list(items)}
  if kind == "dict" and isinstance(content, list):
    pairs = []
    for i, pair in enumerate(content):
      if not (isinstance(pair, list) and len(pair) == 2):
        raise _fail(f"{where}.dict[{i}]", "must be a [key, value] pair")
      pairs.append([_text(pair[0], f"{where}.dict[{i}][0]"), _structure(pair[1], f"{where}.dict[{i}][1]", depth + 1)])
    return {"dict": pairs}
  raise _fail(where, f"has unknown kind {kind!r}")


def structure_leaves(structure: dict[str, Any]) -> list[int]:
  """The leaf indices of a structure, in order."""
  ((kind, content),) = structure.items()
  if kind == "leaf":
    return [content]
  if kind == "dict":
    return [leaf for _, sub in content for leaf in structure_leaves(sub)]
  if kind in ("tuple", "list"):
    return [leaf for sub in content for leaf in structure_leaves(sub)]
  return []


@dataclasses.dataclass(frozen=True)
class Function:
  """One exported function of the program.

  Attributes:
    name: the function's name (``program.<name>(...)``).
    label: what it is (``__call__ (train)``, ``train_step``), for reports.
    method, mode: for a method export, the method and NNX mode it calls (reports replay it eagerly).
    inputs, outputs: its flat inputs and outputs.
    structure: the pytree shape of its return value (see :func:`structure_leaves`).
    updates: the names of the state variables it writes back.
    executables: the kernels named after it (shared ones are named after their first user).
    dispatch_count: kernels it launches per call.
    flops: floating-point operations per call (XLA's cost analysis), which picks the CPU driver.
  """

  name: str
  label: str
  method: str | None
  mode: str | None
  inputs: tuple[Tensor, ...]
  outputs: tuple[Tensor, ...]
  structure: dict[str, Any]
  updates: tuple[str, ...]
  executables: tuple[str, ...]
  dispatch_count: int
  flops: float = 0.0

  def signature(self) -> str:
    inputs = ", ".join(t.describe() for t in self.inputs)
    return f"{self.name}({inputs}) -> ({', '.join(t.describe() for t in self.outputs)})"

  def to_json(self) -> dict[str, Any]:
    return {
      "label": self.label,
      "method": self.method,
      "mode": self.mode,
      "inputs": [t.to_json() for t in self.inputs],
      "outputs": [t.to_json() for t in self.outputs],
      "structure": self.structure,
      "updates": list(self.updates),
      "executables": list(self.executables),
      "dispatch_count": self.dispatch_count,
      "flops": self.flops,
    }


# What decides what callers get: recorded inside the module too, and compared at open.
_INTERFACE_FIELDS = ("label", "method", "mode", "inputs", "outputs", "structure", "updates")


def interface(state: tuple["Variable", ...], functions: dict[str, Function]) -> str:
  """The program's interface as canonical JSON: every state variable and function signature and structure.

  Export records it in the module (``nnx_get_state``'s reflection), so an edit of
  the manifest that changes what callers get (outputs permuted, a variable's type or
  key implementation) contradicts the module and is refused when the artifact opens.
  """
  document = {
    "state": [variable.to_json() for variable in state],
    "functions": {
      name: {field: value for field, value in function.to_json().items() if field in _INTERFACE_FIELDS}
      for name, function in functions.items()
    },
  }
  return json.dumps(document, sort_keys=True, separators=(",", ":"))


def function_name_problem(name: str) -> str | None:
  """Why ``name`` cannot name a program function, or None if it can."""
  if not _IDENTIFIER.fullmatch(name):
    return "must be a Python identifier starting with a letter"
  if name.startswith("nnx_"):
    return "starts with 'nnx_', which nnx-metal keeps for its own functions"
  if name in RESERVED_NAMES:
    return f"is taken by Program.{name}"
  return None


def _function(demote_f64: bool, state_names: frozenset[str]) -> Callable[[Any, str], Function]:
  def check(value, where, name):
    fields = _Fields(value, where)
    outputs = fields.get("outputs", _list(_tensor(demote_f64)))
    function = Function(
      name=name,
      label=fields.get("label", _text),
      method=fields.get("method", _optional(_text)),
      mode=fields.get("mode", _optional(_one_of(("train", "eval")))),
      inputs=fields.get("inputs", _list(_tensor(demote_f64))),
      outputs=outputs,
      structure=fields.get("structure", _structure),
      updates=fields.get("updates", _list(_one_of(state_names))),
      executables=fields.get("executables", _list(_matching(_DISPATCH))),
      dispatch_count=fields.get("dispatch_count", _integer),
      flops=fields.get("flops", _number),
    )
    fields.done()
    if sorted(structure_leaves(function.structure)) != list(range(len(outputs))):
      raise _fail(f"{where}.structure", f"does not hold each of the {len(outputs)} outputs exactly once")
    return function

  return check


@dataclasses.dataclass(frozen=True)
class TargetInfo:
  """The target an artifact was compiled for: its name, IREE backend, runtime drivers and f64 demotion."""

  name: str
  backend: str
  drivers: tuple[str, ...]
  demote_f64: bool

  def to_json(self) -> dict[str, Any]:
    return {"name": self.name, "backend": self.backend, "drivers": list(self.drivers), "demote_f64": self.demote_f64}


def _target(value: Any, where: str) -> TargetInfo:
  fields = _Fields(value, where)
  name = fields.get("name", _one_of(tuple(RUNTIME)))
  drivers, demote_f64 = RUNTIME[name].drivers, RUNTIME[name].demote_f64
  backend = fields.get("backend", _text)
  fields.get("drivers", _one_of((list(drivers),)))
  fields.get("demote_f64", _one_of((demote_f64,)))
  fields.done()
  return TargetInfo(name, backend, drivers, demote_f64)


def is_safe_file_name(relative: str) -> bool:
  """Only the files an artifact is made of: no directories of its own, no ``..``, no absolute paths."""
  if relative in (MODULE, PARAMS, MLIR):
    return True
  folder, _, file_name = relative.partition("/")
  stem, _, suffix = file_name.rpartition(".")
  expected = {"msl": "metal", "spirv": "spv"}.get(folder)
  return expected == suffix and _DISPATCH.fullmatch(stem) is not None


def _file_name(value: Any, where: str) -> str:
  if not isinstance(value, str) or not is_safe_file_name(value):
    raise _fail(where, f"names {str(value)[:80]!r}, which is not a file of an artifact")
  return value


@dataclasses.dataclass(frozen=True)
class Manifest:
  """``manifest.json``, validated.

  Attributes:
    model: ``module:qualname`` of the (first) exported object: a description only.
    objects: for a dict of objects, ``{key: module:qualname}``; else None.
    graphdef_fingerprint: sha256 of the object graph's structure and state layout.
    target: what it was compiled for.
    flags: the full iree-compile flags.
    versions: jax, flax, iree-base-compiler and nnx-metal versions it was built with.
    compile_seconds: iree-compile's wall time.
    dispatches: every kernel of the module.
    rewrites: how many ops each StableHLO rewrite changed (see compile/_rewrites.py).
    hazard_check: the SPIR-V race check's verdict: ``passed``, ``off`` (the user
      opted out) or ``not applicable`` (no SPIR-V).
    state: every state variable, in the order of the module's state functions.
    functions: ``{name: Function}`` in export order.
    files: ``{relative path: sha256}`` of every other file of the artifact.
  """

  model: str
  objects: dict[str, str] | None
  graphdef_fingerprint: str
  target: TargetInfo
  flags: tuple[str, ...]
  versions: dict[str, str]
  compile_seconds: float
  dispatches: tuple[str, ...]
  rewrites: dict[str, int]
  hazard_check: str
  state: tuple[Variable, ...]
  functions: dict[str, Function]
  files: dict[str, str] = dataclasses.field(default_factory=dict)

  def variable(self, name: str) -> Variable | None:
    return next((v for v in self.state if v.name == name), None)

  def interface(self) -> str:
    """See :func:`interface`."""
    return interface(self.state, self.functions)

  def to_json(self) -> str:
    document = {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      "model": self.model,
      "objects": self.objects,
      "graphdef_fingerprint": self.graphdef_fingerprint,
      "target": self.target.to_json(),
      "flags": list(self.flags),
      "versions": self.versions,
      "compile_seconds": self.compile_seconds,
      "dispatches": list(self.dispatches),
      "rewrites": self.rewrites,
      "hazard_check": self.hazard_check,
      "state": [v.to_json() for v in self.state],
      "functions": {name: f.to_json() for name, f in self.functions.items()},
      "files": dict(sorted(self.files.items())),
    }
    return json.dumps(document, indent=1) + "\n"

  @classmethod
  def from_json(cls, text: str | bytes) -> "Manifest":
    """Parses and validates a manifest.

    Raises:
      ArtifactError: not JSON, another format or version, a missing, unknown or
        ill-typed field, or fields that contradict each other; the message names the field.
    """
    if len(text) > MAX_MANIFEST_BYTES:
      raise _fail("the file", f"is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
      document = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
      raise ArtifactError(f"{MANIFEST} is not valid JSON ({e}). The artifact is corrupt; export it again.") from None
    fields = _Fields(document, "")
    if document.get("format") != FORMAT:
      raise ArtifactError(f'{MANIFEST} is not an nnx-metal manifest (no "format": "{FORMAT}").')
    fields.get("format", _text)
    version = fields.get("format_version", lambda v, w: v)
    if type(version) is not int or version != FORMAT_VERSION:
      raise ArtifactError(
        f"{MANIFEST} has artifact format version {version!r}; this nnx-metal reads version {FORMAT_VERSION}. "
        "Export the artifact again with this version."
      )
    target = fields.get("target", _target)
    state = fields.get("state", _list(_variable(target.demote_f64)))
    _check_unique(state, "name", "state")
    expected_globals = global_names([v.name for v in state])
    for index, (variable, expected) in enumerate(zip(state, expected_globals, strict=True)):
      if variable.global_name != expected:
        raise _fail(
          f"state[{index}].global", f"is {variable.global_name!r}, but {variable.name!r} is held in {expected!r}"
        )
    state_names = frozenset(v.name for v in state)
    functions = fields.get("functions", _mapping(_function_key, lambda v, w: v))
    manifest = cls(
      model=fields.get("model", _text),
      objects=fields.get("objects", _optional(_mapping(_text, _text))),
      graphdef_fingerprint=fields.get("graphdef_fingerprint", _matching(_SHA256)),
      target=target,
      flags=fields.get("flags", _list(_text)),
      versions=fields.get("versions", _mapping(_text, _text)),
      compile_seconds=fields.get("compile_seconds", _number),
      dispatches=fields.get("dispatches", _list(_matching(_DISPATCH))),
      rewrites=fields.get("rewrites", _mapping(_matching(_IDENTIFIER), _integer)),
      hazard_check=fields.get("hazard_check", _one_of(HAZARD_CHECKS)),
      state=state,
      functions={
        name: _function(target.demote_f64, state_names)(value, f"functions.{name}", name)
        for name, value in functions.items()
      },
      files=fields.get("files", _mapping(_file_name, _matching(_SHA256))),
    )
    fields.done()
    for required in (MODULE, PARAMS):
      if required not in manifest.files:
        raise _fail("files", f"does not list {required}")
    return manifest


def _function_key(value: Any, where: str) -> str:
  problem = function_name_problem(value)
  if problem:
    raise _fail(where, f"{value[:80]!r} {problem}")
  return value


def _check_unique(items: tuple, attribute: str, where: str) -> None:
  seen = set()
  for item in items:
    value = getattr(item, attribute)
    if value in seen:
      raise _fail(where, f"has {value!r} twice")
    seen.add(value)
