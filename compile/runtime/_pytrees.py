"""A function's return value: its pytree structure as a manifest holds it, checked, and rebuilt around the outputs.

The structure names each output by its index (``{"leaf": i}``) inside containers:

  ``{"none": null}``                                   None
  ``{"tuple": [s, ...]}``, ``{"list": [s, ...]}``      tuples and lists
  ``{"dict": [[key, s], ...]}``                        dicts (string keys)
  ``{"state": [[path, s], ...]}``                      an ``nnx.State``, by path (``["layers", 0, "kernel"]``)
  ``{"variable": {"class", "type", "value": s}}``      an ``nnx.Variable`` (``Param``) holding ``s``
  ``{"namedtuple": {"class", "fields": [[name, s]]}}`` a NamedTuple
  ``{"dataclass": {"class", "fields": [[name, s]]}}``  a dataclass registered as a pytree

Where flax is importable and the classes are known here (flax's Variable types, and every
class ``compile.export`` saw in this process or that :func:`register_output_type` and
``register_variable_type`` registered), a Program returns the very pytree the eager
function returns. Otherwise it returns the plain form, which needs nothing but numpy:
an ``nnx.State`` becomes nested dicts keyed by its path parts, a Variable its value, a
NamedTuple or dataclass a dict of its fields. Classes named in a manifest are never imported.
"""

import functools
from collections.abc import Callable
from typing import Any

from ._fields import MAX_DEPTH, fail, integer, list_of, path_part, string
from ._interface import IDENTIFIER

_REGISTERED: dict[str, type] = {}


def register_output_type(cls: type) -> type:
  """Lets programs return ``cls`` (a NamedTuple or registered dataclass) as itself; returns ``cls`` (a decorator).

  ``compile.export`` registers the output types of the functions it exports; in a fresh
  process, register yours before calling a loaded program (artifacts never import code).
  """
  if not isinstance(cls, type):
    raise TypeError(f"register_output_type takes a class, not {cls!r}.")
  _REGISTERED[f"{cls.__module__}:{cls.__qualname__}"] = cls
  return cls


@functools.cache
def _flax_nnx() -> Any:
  """flax.nnx, or None where flax is not installed (the plain form is returned then)."""
  try:
    from flax import nnx
  except ImportError:
    return None
  return nnx


# Checking (manifest side): strict, linear in the structure's size.


def _pairs(key_check, depth: int):
  def check(value, where):
    if not isinstance(value, list) or len(value) > 1 << 16:
      raise fail(where, "must be a list of at most 65536 [key, structure] pairs")
    pairs = []
    for i, pair in enumerate(value):
      if not (isinstance(pair, list) and len(pair) == 2):
        raise fail(f"{where}[{i}]", "must be a [key, value] pair")
      pairs.append([key_check(pair[0], f"{where}[{i}][0]"), structure_check(pair[1], f"{where}[{i}][1]", depth + 1)])
    return pairs

  return check


def _identifier(value: Any, where: str) -> str:
  return string(value, where, pattern=IDENTIFIER, limit=256)


def _path(value: Any, where: str) -> list:
  return list(list_of(path_part, limit=256)(value, where))


def _object(value: Any, where: str, keys: tuple[str, ...]) -> dict:
  if not isinstance(value, dict) or set(value) != set(keys):
    raise fail(where, f"must be an object with exactly the fields {', '.join(keys)}")
  return value


def structure_check(value: Any, where: str, depth: int = 0) -> dict[str, Any]:
  """A return value's structure (see the module docstring), checked field by field."""
  if depth > MAX_DEPTH or not isinstance(value, dict) or len(value) != 1:
    raise fail(
      where,
      f"must be one of {{leaf}}, {{none}}, {{tuple}}, {{list}}, {{dict}}, {{state}}, {{variable}}, "
      f"{{namedtuple}}, {{dataclass}}, nested at most {MAX_DEPTH} deep",
    )
  ((kind, content),) = value.items()
  inner = f"{where}.{kind}"
  if kind == "leaf":
    return {"leaf": integer(content, inner)}
  if kind == "none" and content is None:
    return {"none": None}
  if kind in ("tuple", "list"):
    items = list_of(lambda v, w: structure_check(v, w, depth + 1), limit=1 << 16)(content, inner)
    return {kind: list(items)}
  if kind == "dict":
    return {"dict": _pairs(string, depth)(content, inner)}
  if kind == "state":
    return {"state": _pairs(_path, depth)(content, inner)}
  if kind == "variable":
    fields = _object(content, inner, ("class", "type", "value"))
    return {
      "variable": {
        "class": string(fields["class"], f"{inner}.class"),
        "type": _identifier(fields["type"], f"{inner}.type"),
        "value": structure_check(fields["value"], f"{inner}.value", depth + 1),
      }
    }
  if kind in ("namedtuple", "dataclass"):
    fields = _object(content, inner, ("class", "fields"))
    return {
      kind: {
        "class": string(fields["class"], f"{inner}.class"),
        "fields": _pairs(_identifier, depth)(fields["fields"], f"{inner}.fields"),
      }
    }
  raise fail(where, f"has unknown kind {kind!r}")


def structure_leaves(structure: dict[str, Any]) -> list[int]:
  """The leaf indices of a structure, in order."""
  ((kind, content),) = structure.items()
  if kind == "leaf":
    return [content]
  if kind in ("tuple", "list"):
    return [leaf for sub in content for leaf in structure_leaves(sub)]
  if kind in ("dict", "state"):
    return [leaf for _, sub in content for leaf in structure_leaves(sub)]
  if kind == "variable":
    return structure_leaves(content["value"])
  if kind in ("namedtuple", "dataclass"):
    return [leaf for _, sub in content["fields"] for leaf in structure_leaves(sub)]
  return []


# Rebuilding (Program side).


def _variable(content: dict[str, Any], value: Any, variable_class: Callable[[str], type | None]) -> Any:
  cls = variable_class(content["class"]) if _flax_nnx() is not None else None
  return value if cls is None or cls.__name__ != content["type"] else cls(value)


def _nested(pairs: list) -> dict:
  """``[(path, value)]`` as nested dicts keyed by path parts: the plain form of an nnx.State."""
  root: dict = {}
  for path, value in pairs:
    node = root
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1] if path else ""] = value
  return root


def unflatten_outputs(
  structure: dict[str, Any], leaves: list[Any], variable_class: Callable[[str], type | None] = lambda path: None
) -> Any:
  """Rebuilds a function's return value from its manifest ``structure`` around the output arrays.

  ``variable_class`` looks up the Variable class a ``module:qualname`` names (None: unknown, plain value).
  """

  def rebuild(sub: dict[str, Any]) -> Any:
    return unflatten_outputs(sub, leaves, variable_class)

  ((kind, content),) = structure.items()
  if kind == "leaf":
    return leaves[content]
  if kind == "none":
    return None
  if kind == "dict":
    return {key: rebuild(sub) for key, sub in content}
  if kind in ("tuple", "list"):
    items = [rebuild(sub) for sub in content]
    return items if kind == "list" else tuple(items)
  if kind == "variable":
    return _variable(content, rebuild(content["value"]), variable_class)
  if kind == "state":
    pairs = [(tuple(path), rebuild(sub)) for path, sub in content]
    nnx = _flax_nnx()
    return nnx.from_flat_state(pairs) if nnx is not None else _nested(pairs)
  fields = {name: rebuild(sub) for name, sub in content["fields"]}
  cls = _REGISTERED.get(content["class"])
  return fields if cls is None else cls(**fields)
