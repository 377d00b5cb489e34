"""The program's calling convention: the names a module and its callers agree on.

A module exported by nnx-metal holds the State in globals named after the NNX paths
(:func:`global_names`), reads and writes all of them through ``nnx_get_state`` and
``nnx_set_state``, loads their initial values from the parameter archive under
``PARAMETER_SCOPE``, and records its interface (:func:`interface`) and state order in
``nnx_get_state``'s reflection, where opening an artifact compares them with the manifest.
"""

import json
import re

# The module's own functions that read and write every state global (see compile/_assemble.py).
GET_STATE = "nnx_get_state"
SET_STATE = "nnx_set_state"
# nnx_get_state's reflection keys.
STATE_ORDER = "nnx.state_globals"
INTERFACE = "nnx.interface"
# The parameter scope the module's globals are loaded from (``--parameters=model=params.irpa``).
PARAMETER_SCOPE = "model"

KEY_WORDS = {"threefry2x32": 2, "rbg": 4, "unsafe_rbg": 4}  # uint32 words per PRNG key
KEY_IMPLS = tuple(KEY_WORDS)
# Program attributes: an exported function may not be called like one of them.
RESERVED_NAMES = frozenset(
  {"artifact", "driver", "functions", "state", "arrays", "set_arrays", "load_state", "update", "save", "functional"}
)
IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
# A function names its kernels (``<name>_dispatch_<n>_<op>``), their files (``spirv/<kernel>.spv``) and
# IREE's dumps of them (``<module>_<kernel>.spv``, the name twice): 64 characters keep those under the
# 255 bytes a file name may have (IREE 3.13 silently skips a dump it cannot name, 127 characters did).
MAX_FUNCTION_NAME = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
GLOBAL_NAME = re.compile(r"[A-Za-z0-9_.$-]+")


def path_name(path: tuple) -> str:
  """A state variable's name: its NNX path joined with dots (``linear1.w``, ``layers.0.b``)."""
  return ".".join(str(part) for part in path)


def global_names(names: list[str]) -> list[str]:
  """A unique, MLIR-safe global (and parameter key) name per state variable, readable as its NNX path.

  A name that another already took gets the first free ``$2``, ``$3``, ... (``$`` is in no
  sanitized path); each base remembers where its search stopped, so n names cost O(n) lookups
  even when all of them sanitize alike (a manifest is parsed before any hash is checked).
  """
  result, seen, next_suffix = [], set(), {}
  for name in names:
    safe = _UNSAFE.sub("_", name)
    unique, suffix = safe, next_suffix.get(safe, 2)
    while unique in seen:
      unique, suffix = f"{safe}${suffix}", suffix + 1
    next_suffix[safe] = suffix
    seen.add(unique)
    result.append(unique)
  return result


def function_name_problem(name: str) -> str | None:
  """Why ``name`` cannot name a program function, or None if it can."""
  if not IDENTIFIER.fullmatch(name):
    return "must be a Python identifier starting with a letter"
  if len(name) > MAX_FUNCTION_NAME:
    return f"is {len(name)} characters long; a function name may have at most {MAX_FUNCTION_NAME}"
  if name.startswith("nnx_"):
    return "starts with 'nnx_', which nnx-metal keeps for its own functions"
  if name in RESERVED_NAMES:
    return f"is taken by Program.{name}"
  return None


# What decides what callers get: recorded inside the module too, and compared at open.
_INTERFACE_FIELDS = ("label", "method", "mode", "inputs", "outputs", "structure", "updates")


def written_names(state_names, functions, target) -> set[str]:
  """The state variables ``nnx_set_state`` takes: those some function writes, or all of them.

  On a target with constant state (``RuntimeTarget.constant_state``) the others are immutable
  globals (compile/_assemble.py); ``functions`` are the records, each with its ``updates``.
  """
  if not target.constant_state:
    return set(state_names)
  return {name for function in functions for name in function.updates}


def interface(state, functions) -> str:
  """The program's interface as canonical JSON: every state variable and function signature and structure.

  ``state`` holds the manifest's Variables and ``functions`` its ``{name: Function}``.
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
