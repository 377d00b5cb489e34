"""Reading a JSON document field by field: each check takes a value and where it is, returns it or raises.

Every error names the field (``functions.eval.inputs[0].shape``); unread fields are refused.
:func:`parse_json` reads the document itself in time linear in its length and memory
bounded by it, whatever the bytes: it runs before any hash is checked.
"""

import json
import math
import re
from collections.abc import Callable
from typing import Any

from ._errors import ArtifactError
from ._file_names import MANIFEST

MAX_DIMENSION = 1 << 40
MAX_DEPTH = 32
# Objects and lists a manifest may hold: 1M is 10 times a 100k-variable model's, and caps what
# parsing allocates (a 63 MiB file of empty objects would be 21M dicts, 1.5 GB).
MAX_CONTAINERS = 1 << 20
# Values in lists and objects (commas, counted the same way): 2M, 15 per variable of that model.
MAX_VALUES = 1 << 21
# Digits of an integer literal: Python's int() is quadratic in them (and refuses more than 4300).
MAX_INTEGER_DIGITS = 40
# Characters no text field of a manifest holds: controls (terminal escapes), bidirectional
# overrides and lone surrogates (which no UTF-8 encoder writes).
_FORBIDDEN_TEXT = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  document = dict(pairs)
  if len(document) != len(pairs):
    seen = set()
    duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
    raise ArtifactError(
      f"{MANIFEST} holds the key {duplicate[:80]!r} twice in one object: which one counts is ambiguous. "
      "The artifact is corrupt or was edited; export it again."
    )
  return document


def _integer_literal(text: str) -> int:
  if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
    raise ArtifactError(
      f"{MANIFEST} holds an integer of {len(text)} digits, more than any field takes. "
      "The artifact is corrupt or was edited; export it again."
    )
  return int(text)


def parse_json(text: str | bytes) -> Any:
  """The JSON document ``text``, in linear time and bounded memory: no duplicate keys, no huge integers.

  Raises:
    ArtifactError: not valid UTF-8 JSON, nested too deep, more than ``MAX_CONTAINERS``
      objects and lists, a key twice in one object, or an integer of more than ``MAX_INTEGER_DIGITS`` digits.
  """
  opening, comma = ((b"{", b"["), b",") if isinstance(text, bytes) else (("{", "["), ",")
  containers = text.count(opening[0]) + text.count(opening[1])  # upper bounds: brackets in strings count too
  values = text.count(comma)
  if containers > MAX_CONTAINERS or values > MAX_VALUES:
    raise ArtifactError(
      f"{MANIFEST} holds {containers} objects and lists and {values} values, more than the {MAX_CONTAINERS} and "
      f"{MAX_VALUES} a manifest may. The artifact is corrupt or was edited; export it again."
    )
  try:
    return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_int=_integer_literal)
  except ArtifactError:
    raise
  except (ValueError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError is a ValueError
    raise ArtifactError(f"{MANIFEST} is not valid JSON ({e}). The artifact is corrupt; export it again.") from None


def fail(where: str, problem: str) -> ArtifactError:
  return ArtifactError(f"{MANIFEST}: {where} {problem}. The artifact is corrupt or was edited; export it again.")


class Fields:
  """One JSON object read field by field; every error names the field; unread fields are refused."""

  def __init__(self, value: Any, where: str):
    if not isinstance(value, dict):
      raise fail(where, f"must be an object, not {type(value).__name__}")
    self.value, self.where, self._read = value, where, set()

  def get(self, key: str, check: Callable[[Any, str], Any]) -> Any:
    self._read.add(key)
    where = f"{self.where}.{key}" if self.where else key
    if key not in self.value:
      raise fail(where, "is missing")
    return check(self.value[key], where)

  def done(self) -> None:
    unknown = sorted(set(self.value) - self._read)
    if unknown:
      raise fail(self.where or "the top level", f"has unknown field(s) {', '.join(map(repr, unknown[:5]))}")


def string(value: Any, where: str, *, pattern: re.Pattern | None = None, limit: int = 4096) -> str:
  if not isinstance(value, str) or len(value) > limit:
    raise fail(where, f"must be a string of at most {limit} characters")
  if pattern is not None and not pattern.fullmatch(value):
    raise fail(where, f"is {value[:80]!r}, which is not of the form {pattern.pattern}")
  forbidden = _FORBIDDEN_TEXT.search(value)
  if forbidden:
    raise fail(where, f"holds the character {forbidden.group()!r}, which no text of a manifest holds")
  return value


def matching(pattern: re.Pattern) -> Callable[[Any, str], str]:
  return lambda value, where: string(value, where, pattern=pattern)


def _typed(value: Any) -> tuple[type, Any] | None:
  """``value`` with its type, as a set member: 1 is not True, 2.0 is not 2; None for a list or an object."""
  return None if isinstance(value, list | dict) else (type(value), value)


def one_of(choices) -> Callable[[Any, str], Any]:
  """Exactly one of ``choices``, of the same type: 1 is not True, 2.0 is not 2, a list is no name.

  Looked up in a set (a list of 100k names is checked in linear time); list choices are compared one by one.
  """
  hashable = {_typed(choice) for choice in choices} - {None}
  lists = [choice for choice in choices if _typed(choice) is None]

  def check(value, where):
    key = _typed(value)
    if (key not in hashable) if key is not None else not any(type(value) is type(c) and value == c for c in lists):
      shown = ", ".join(map(repr, list(choices)[:8])) + (", ..." if len(choices) > 8 else "")
      raise fail(where, f"is {str(value)[:80]!r}; expected one of {shown}")
    return value

  return check


def optional(check: Callable) -> Callable[[Any, str], Any]:
  return lambda value, where: None if value is None else check(value, where)


def integer(value: Any, where: str, *, low: int = 0, high: int = MAX_DIMENSION) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
    raise fail(where, f"must be an integer in [{low}, {high}]")
  return value


def number(value: Any, where: str) -> float:
  if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
    raise fail(where, "must be a finite number >= 0")
  return float(value)


def list_of(item: Callable[[Any, str], Any], *, limit: int = 1 << 20) -> Callable[[Any, str], tuple]:
  def check(value, where):
    if not isinstance(value, list) or len(value) > limit:
      raise fail(where, f"must be a list of at most {limit} items")
    return tuple(item(v, f"{where}[{i}]") for i, v in enumerate(value))

  return check


def mapping(key: Callable, item: Callable[[Any, str], Any]) -> Callable[[Any, str], dict]:
  def check(value, where):
    if not isinstance(value, dict):
      raise fail(where, "must be an object")
    return {key(k, f"{where} key"): item(v, f"{where}.{k}") for k, v in value.items()}

  return check


def scalar(value: Any, where: str) -> str | int | float | bool:
  if isinstance(value, str):
    return string(value, where)
  if isinstance(value, bool | int) or (isinstance(value, float) and math.isfinite(value)):
    return value
  raise fail(where, "must be a string, number or boolean")


def path_part(value: Any, where: str) -> str | int | tuple[str | int, ...]:
  """A key of an NNX path: a name, an index, or a tuple of them (flax's SpectralNorm keys its
  statistics by the parameter's path, ``('kernel', 'sigma')``), written as a JSON list."""
  if isinstance(value, list):
    if not 1 <= len(value) <= 16 or any(isinstance(part, list) for part in value):
      raise fail(where, "must be a name, an index, or a list of 1 to 16 names or indices")
    return tuple(path_part(part, f"{where}[{i}]") for i, part in enumerate(value))
  if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
    return value
  return string(value, where, limit=256)
