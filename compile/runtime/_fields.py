"""Reading a JSON document field by field: each check takes a value and where it is, returns it or raises.

Every error names the field (``functions.eval.inputs[0].shape``); unread fields are refused.
"""

import math
import re
from collections.abc import Callable
from typing import Any

from ._errors import ArtifactError
from ._file_names import MANIFEST

MAX_DIMENSION = 1 << 40
MAX_DEPTH = 32


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
  return value


def matching(pattern: re.Pattern) -> Callable[[Any, str], str]:
  return lambda value, where: string(value, where, pattern=pattern)


def one_of(choices) -> Callable[[Any, str], Any]:
  """Exactly one of ``choices``, of the same type: 1 is not True, 2.0 is not 2, a list is no name."""

  def check(value, where):
    if not any(type(value) is type(choice) and value == choice for choice in choices):
      raise fail(where, f"is {str(value)[:80]!r}; expected one of {', '.join(map(repr, choices))}")
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
  if isinstance(value, str | bool | int) or (isinstance(value, float) and math.isfinite(value)):
    return value
  raise fail(where, "must be a string, number or boolean")


def path_part(value: Any, where: str) -> str | int:
  if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
    return value
  return string(value, where, limit=256)
