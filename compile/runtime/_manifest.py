"""``manifest.json``: what an artifact holds, as one frozen record parsed and validated in one place.

Everything that reads a manifest reads it through :meth:`Manifest.from_json`, which
checks every field (type, range, cross-references), refuses unknown fields and
names the field in every error. Nothing in a manifest is ever imported or called:
class names are descriptions, resolved only against types the process already knows
(see ``_variables.py``).
"""

import dataclasses
import json
import re
from typing import Any

from ._errors import ArtifactError
from ._fields import Fields, fail, integer, list_of, mapping, matching, one_of, optional, parse_json, string
from ._file_names import (
  FORMAT,
  FORMAT_VERSION,
  KERNEL_NAME,
  MANIFEST,
  MAX_MANIFEST_BYTES,
  MODULE,
  PARAMS,
  is_safe_file_name,
)
from ._interface import IDENTIFIER, function_name_problem, global_names, interface, written_names
from ._records import Function, Variable, function_check, variable_check
from ._targets import RUNTIME_TARGETS, RuntimeTarget

SHA256 = re.compile(r"[0-9a-f]{64}")
HAZARD_CHECKS = ("passed", "off", "not applicable")


def _target(value: Any, where: str) -> RuntimeTarget:
  fields = Fields(value, where)
  target = RUNTIME_TARGETS[fields.get("name", one_of(tuple(RUNTIME_TARGETS)))]
  fields.get("backend", one_of((target.backend,)))
  fields.get("drivers", one_of((list(target.drivers),)))
  fields.get("demote_f64", one_of((target.demote_f64,)))
  fields.done()
  return target


def _file_name(value: Any, where: str) -> str:
  if not isinstance(value, str) or not is_safe_file_name(value):
    raise fail(where, f"names {str(value)[:80]!r}, which is not a file of an artifact")
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
    compile_seconds: iree-compile's wall time in the process that exported it; 0.0 once opened. Not
      written to manifest.json: two exports of the same program give the same bytes and digest.
    dispatches: every kernel of the module.
    rewrites: how many ops each StableHLO rewrite changed (see compile/rewrites/).
    hazard_check: the SPIR-V race check's verdict: ``passed``, ``off`` (the user
      opted out) or ``not applicable`` (no SPIR-V).
    state: every state variable, in the order of the module's state functions.
    functions: ``{name: Function}`` in export order.
    files: ``{relative path: sha256}`` of every other file of the artifact.
  """

  model: str
  objects: dict[str, str] | None
  graphdef_fingerprint: str
  target: RuntimeTarget
  flags: tuple[str, ...]
  versions: dict[str, str]
  compile_seconds: float = dataclasses.field(compare=False)  # a timing: neither compared nor written
  dispatches: tuple[str, ...]
  rewrites: dict[str, int]
  hazard_check: str
  state: tuple[Variable, ...]
  functions: dict[str, Function]
  files: dict[str, str] = dataclasses.field(default_factory=dict)

  def variable(self, name: str) -> Variable | None:
    return next((v for v in self.state if v.name == name), None)

  def written(self) -> tuple[Variable, ...]:
    """The state variables some function writes, in state order: ``nnx_set_state`` takes these.

    The others are constant on the device (immutable globals, see compile/_assemble.py):
    replacing one loads the module again. Targets without constant state write every variable.
    """
    names = written_names([v.name for v in self.state], self.functions.values(), self.target)
    return tuple(v for v in self.state if v.name in names)

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
      raise fail("the file", f"is larger than {MAX_MANIFEST_BYTES} bytes")
    document = parse_json(text)
    fields = Fields(document, "")
    if document.get("format") != FORMAT:
      raise ArtifactError(f'{MANIFEST} is not an nnx-metal manifest (no "format": "{FORMAT}").')
    fields.get("format", string)
    version = fields.get("format_version", lambda v, w: v)
    if type(version) is not int or version != FORMAT_VERSION:
      raise ArtifactError(
        f"{MANIFEST} has artifact format version {version!r}; this nnx-metal reads version {FORMAT_VERSION}. "
        "Export the artifact again with this version."
      )
    target = fields.get("target", _target)
    state = fields.get("state", list_of(variable_check(target.demote_f64)))
    _check_unique(state, "name", "state")
    expected_globals = global_names([v.name for v in state])
    for index, (variable, expected) in enumerate(zip(state, expected_globals, strict=True)):
      if variable.global_name != expected:
        raise fail(
          f"state[{index}].global", f"is {variable.global_name!r}, but {variable.name!r} is held in {expected!r}"
        )
    state_names = frozenset(v.name for v in state)
    functions = fields.get("functions", mapping(_function_key, lambda v, w: v))
    manifest = cls(
      model=fields.get("model", string),
      objects=fields.get("objects", optional(mapping(string, string))),
      graphdef_fingerprint=fields.get("graphdef_fingerprint", matching(SHA256)),
      target=target,
      flags=fields.get("flags", list_of(string)),
      versions=fields.get("versions", mapping(string, string)),
      compile_seconds=0.0,
      dispatches=fields.get("dispatches", list_of(matching(KERNEL_NAME))),
      rewrites=fields.get("rewrites", mapping(matching(IDENTIFIER), integer)),
      hazard_check=fields.get("hazard_check", one_of(_hazard_checks(target))),
      state=state,
      functions={
        name: function_check(target.demote_f64, state_names)(value, f"functions.{name}", name)
        for name, value in functions.items()
      },
      files=fields.get("files", mapping(_file_name, matching(SHA256))),
    )
    fields.done()
    for required in (MODULE, PARAMS):
      if required not in manifest.files:
        raise fail("files", f"does not list {required}")
    _check_kernels(manifest)
    return manifest


def _hazard_checks(target: RuntimeTarget) -> tuple[str, ...]:
  """The verdicts export can record for ``target``: only SPIR-V kernels are checked for races."""
  return ("passed", "off") if target.backend.endswith("spirv") else ("not applicable",)


def _check_kernels(manifest: "Manifest") -> None:
  """Every function's kernels and every kernel file name a kernel of ``dispatches``."""
  dispatches = set(manifest.dispatches)
  for name, function in manifest.functions.items():
    unknown = [kernel for kernel in function.executables if kernel not in dispatches]
    if unknown:
      raise fail(f"functions.{name}.executables", f"names {unknown[0][:80]!r}, which dispatches does not list")
  for relative in manifest.files:
    folder, _, file_name = relative.partition("/")
    if file_name and file_name.rpartition(".")[0] not in dispatches:
      raise fail(f"files.{relative[:80]}", "is the source of a kernel that dispatches does not list")


def _function_key(value: Any, where: str) -> str:
  problem = function_name_problem(value)
  if problem:
    raise fail(where, f"{value[:80]!r} {problem}")
  return value


def _check_unique(items: tuple, attribute: str, where: str) -> None:
  seen = set()
  for item in items:
    value = getattr(item, attribute)
    if value in seen:
      raise fail(where, f"has {value!r} twice")
    seen.add(value)
