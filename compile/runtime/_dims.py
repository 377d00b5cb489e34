"""Symbolic dimensions: a function exported for any batch size (``jax.export.symbolic_shape("b")``).

An input's shape may name a dimension (``b``) instead of a size, and an output's may be an
expression of them (``2*b``), as JAX prints it. Each has declared bounds: the range JAX proves
from the dimension's constraints (``"b <= 64"``); a Metal build knows its maximum sizes from
them, and a call outside them is refused before it reaches the device. In a manifest a
dimension is ``{"dim": "b", "min": 1, "max": 64}`` (``"max": null``: unbounded).
"""

import ast
import dataclasses
import functools
import re
from typing import Any

from ._errors import SignatureError
from ._fields import MAX_DIMENSION, Fields, fail, integer, optional, string

_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FUNCTIONS = {"floordiv": lambda a, b: a // b, "mod": lambda a, b: a % b, "max": max, "min": min}
_OPERATORS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}
_OPERATORS |= {ast.FloorDiv: _FUNCTIONS["floordiv"], ast.Mod: _FUNCTIONS["mod"]}


@dataclasses.dataclass(frozen=True)
class Dim:
  """A symbolic dimension of a function's input or output.

  Attributes:
    expression: the dimension's name (``b``) for an input, an expression of names (``2*b``) for an output.
    low, high: its declared bounds (``high`` None: unbounded).
  """

  expression: str
  low: int = 1
  high: int | None = None

  def __repr__(self) -> str:  # how signatures show it: float32[b, 2]
    return self.expression

  def __str__(self) -> str:  # how MLIR types write it: tensor<?x2xf32> (the module's signature check formats it)
    return "?"

  def to_json(self) -> dict[str, Any]:
    return {"dim": self.expression, "min": self.low, "max": self.high}

  def bounds(self) -> str:
    return f"[{self.low}, {'∞' if self.high is None else self.high}]"


@functools.lru_cache(maxsize=1024)
def _parse(expression: str) -> ast.expr:
  """The expression's syntax tree, holding only names, integers, + - * // % and floordiv/mod/max/min."""
  tree = ast.parse(expression, mode="eval").body
  for node in ast.walk(tree):
    allowed = (ast.Name, ast.Constant, ast.BinOp, ast.UnaryOp, ast.Call, ast.Load, ast.USub, *_OPERATORS)
    if not isinstance(node, allowed) or (isinstance(node, ast.Constant) and type(node.value) is not int):
      raise ValueError(f"{type(node).__name__} is not part of a dimension expression")
    if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS):
      raise ValueError("only floordiv, mod, max and min are called in a dimension expression")
  return tree


def evaluate(expression: str, sizes: dict[str, int]) -> int:
  """The value of a dimension expression for the sizes of its names."""

  def value(node: ast.expr) -> int:
    if isinstance(node, ast.Constant):
      return node.value
    if isinstance(node, ast.Name):
      if node.id not in sizes:
        raise SignatureError(f"The dimension {node.id} is not given by any input.")
      return sizes[node.id]
    if isinstance(node, ast.UnaryOp):
      return -value(node.operand)
    if isinstance(node, ast.BinOp):
      return _OPERATORS[type(node.op)](value(node.left), value(node.right))
    return _FUNCTIONS[node.func.id](*(value(arg) for arg in node.args))

  return value(_parse(expression))


def dimension(value: Any, where: str) -> int | Dim:
  """A manifest's dimension: a size, or ``{"dim", "min", "max"}``."""
  if not isinstance(value, dict):
    return integer(value, where)
  fields = Fields(value, where)
  expression = fields.get("dim", lambda v, w: string(v, w, limit=256))
  low = fields.get("min", lambda v, w: integer(v, w, low=0))
  high = fields.get("max", optional(lambda v, w: integer(v, w, low=low, high=MAX_DIMENSION)))
  fields.done()
  try:
    _parse(expression)
  except (SyntaxError, ValueError, RecursionError) as e:
    raise fail(f"{where}.dim", f"is {expression[:80]!r}, which is not a dimension expression ({e})") from None
  return Dim(expression, low, high)


def is_symbol(dim: Any) -> bool:
  return isinstance(dim, Dim) and _SYMBOL.fullmatch(dim.expression) is not None


def bind(shape: tuple, got: tuple[int, ...], sizes: dict[str, int], what: str) -> bool:
  """Whether ``got`` fits ``shape``; binds the names of ``shape`` in ``sizes``, refusing sizes outside their bounds."""
  if len(got) != len(shape):
    return False
  for dim, size in zip(shape, got, strict=True):
    if isinstance(dim, int):
      if dim != size:
        return False
      continue
    if dim.expression in sizes:
      if sizes[dim.expression] != size:
        raise SignatureError(
          f"{what}: dimension {dim.expression} is {size} here but {sizes[dim.expression]} in an earlier input."
        )
      continue
    if size < dim.low or (dim.high is not None and size > dim.high):
      raise SignatureError(
        f"{what}: dimension {dim.expression} = {size} is outside its declared bounds {dim.bounds()}. Export with "
        f"wider constraints (jax.export.symbolic_shape('{dim.expression}', constraints=('{dim.expression} <= "
        f"{size}',))), or call with a size inside them."
      )
    sizes[dim.expression] = size
  return True


def concrete(shape: tuple, sizes: dict[str, int]) -> tuple[int, ...]:
  """``shape`` with its dimensions evaluated for ``sizes``."""
  return tuple(dim if isinstance(dim, int) else evaluate(dim.expression, sizes) for dim in shape)
