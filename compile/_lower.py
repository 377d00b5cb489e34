"""Lowering: split NNX objects once, trace a pure ``fn(state, *args) -> (outputs, changed state)`` to StableHLO."""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import rewrites
from ._layout import Leaf, StateLayout
from ._stablehlo import OpSite, clean_for_iree, embeddable_functions, module_text
from ._targets import Target, get_target
from .rewrites._isolation import isolate_sites
from .runtime import Dim, SignatureError, StateMismatchError, path_name


@dataclasses.dataclass(frozen=True)
class Lowered:
  """One function of NNX objects lowered to StableHLO that iree-compile accepts.

  The compiled function takes ``(*state, *args)`` and returns ``(*outputs, *updated)``,
  each flat: ``updated`` holds only the state leaves the function changed (their
  indices in ``updates``); every other leaf comes out as it went in.

  Attributes:
    name: the function's name; the standalone module is ``jit_<name>``.
    mlir: a standalone StableHLO module with the function as ``@main``, every op
      carrying its Python source location.
    functions: the same functions, private and renamed ``<name>.<symbol>``, to
      paste into a larger module (see ``_assemble.py``).
    graphdef: the objects' GraphDef, closed over by the function.
    model_name: the class name of the (first) object.
    method: the function's name.
    state: the State's flat layout (names, Variable types, shapes, dtypes).
    args: the function's flat inputs.
    outputs: the function's flat outputs.
    output_treedef: the pytree structure of the function's return value.
    updates: indices into ``state.leaves`` of the leaves the function changes.
    state_types, arg_types, output_types: the MLIR tensor types at the boundary.
    sites: every op of the program, with its source line, for target checks.
    target: the target whose StableHLO rewrites were applied, or None (as JAX lowered it).
    rewrites: ``{rewrite: ops changed}`` for that target (see ``compile/rewrites/``).
    flops: floating-point operations per call, from XLA's cost analysis (0 if it has none).
  """

  name: str
  mlir: str
  functions: str
  graphdef: nnx.GraphDef
  model_name: str
  method: str
  state: StateLayout
  args: tuple[Leaf, ...]
  outputs: tuple[Leaf, ...]
  output_treedef: Any
  updates: tuple[int, ...]
  state_types: tuple[str, ...]
  arg_types: tuple[str, ...]
  output_types: tuple[str, ...]
  sites: tuple[OpSite, ...]
  target: str | None = None
  rewrites: dict[str, int] = dataclasses.field(default_factory=dict)
  flops: float = 0.0

  def signature(self) -> str:
    """A readable signature, e.g. ``MLP.__call__(args[0]: float32[3, 2]) -> (outputs[0]: float32[3, 5])``."""
    args = ", ".join(leaf.describe() for leaf in self.args)
    outs = ", ".join(leaf.describe() for leaf in self.outputs)
    return f"{self.model_name}.{self.method}({args}) -> ({outs}) with {len(self.state.leaves)} state leaves"


def call_with_objects(objects: Any, fn: Callable, args: tuple, keys: tuple[str, ...] | None = None) -> Any:
  """Calls ``fn`` the way exported functions are called: a dict of objects is spread positionally.

  ``keys`` is the order the user wrote the dict in: ``nnx.merge`` rebuilds a dict
  with its keys sorted, which would hand ``fn`` its objects in another order.
  """
  if isinstance(objects, dict):
    return fn(*(objects[key] for key in keys or objects), *args)
  return fn(objects, *args)


def method_caller(method: str, mode: str | None = None) -> Callable:
  """``fn(model, *args)`` calling ``model.<method>(*args)``, in ``mode`` ('train'/'eval') when given.

  The mode is set on the traced copy of the model only (``nnx.merge`` builds a
  fresh one per trace), so the user's model keeps its own mode.
  """
  if mode not in (None, "train", "eval"):
    raise ValueError(f"mode must be 'train', 'eval' or None, not {mode!r}.")

  def call(model, *args):
    if mode is not None:
      getattr(model, mode)()
    return getattr(model, method)(*args)

  return call


def set_mode(objects: Any, mode: str | None) -> None:
  """Puts the (first) object in ``mode`` ('train' or 'eval'); None leaves it as it is."""
  if mode is not None:
    getattr(next(iter(objects.values())) if isinstance(objects, dict) else objects, mode)()


def _static_attributes(objects: Any) -> dict[tuple, Any]:
  """``{path: value}`` of the object graph's static attributes: what the GraphDef holds besides its structure."""
  return {
    path: node
    for path, node in nnx.iter_graph(objects)
    if not (nnx.graph.is_graph_node(node) or _holds_data(node))
    and not str(path[-1] if path else "").startswith("_pytree__")
  }


def _holds_data(node: Any) -> bool:
  """Whether ``node`` is or holds a Variable or an array (a dict of BatchStats is state, not a static value)."""
  leaves = jax.tree.leaves(node, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return any(isinstance(leaf, nnx.Variable | jax.Array | np.ndarray) for leaf in leaves)


def _same(before: Any, after: Any) -> bool:
  if before is after:
    return True
  try:
    return bool(before == after)
  except Exception:  # noqa: BLE001 - a user's attribute whose == raises or is ambiguous: treat it as changed
    return False


def static_changes(before: dict[tuple, Any], after: dict[tuple, Any]) -> list[str]:
  """What changed between two :func:`_static_attributes` snapshots, one line per attribute."""
  lines = []
  for path in sorted(before.keys() | after.keys(), key=repr):
    if path in before and path in after and _same(before[path], after[path]):
      continue
    name = path_name(path)
    if path not in after:
      lines.append(f"deletes the attribute {name}")
    elif path not in before:
      lines.append(f"adds the attribute {name} = {after[path]!r:.60}")
    else:
      lines.append(f"changes the attribute {name} from {before[path]!r:.60} to {after[path]!r:.60}")
  return lines


@dataclasses.dataclass
class _Trace:
  """What one trace of the pure function found out about the objects, besides its StableHLO.

  Attributes:
    changed: indices of the state leaves the function assigned.
    static_before, static_after: the static attributes before and after the call.
    graphdef_after: the objects' GraphDef after the call (their static attributes included).
  """

  changed: list[int] = dataclasses.field(default_factory=list)
  static_before: dict[tuple, Any] = dataclasses.field(default_factory=dict)
  static_after: dict[tuple, Any] = dataclasses.field(default_factory=dict)
  graphdef_after: Any = None


def _pure_function(
  graphdef: nnx.GraphDef,
  layout: StateLayout,
  fn: Callable,
  trace: _Trace,
  keys: tuple[str, ...] | None,
  mode: str | None = None,
  wrap_inputs: Callable[[tuple], tuple] = lambda args: args,
) -> Callable:
  """``pure(state_values, *args) -> (outputs, changed_values)``; records what it saw in ``trace``.

  ``wrap_inputs`` turns the inputs as they cross into IREE back into what ``fn`` takes (typed keys).
  """

  def pure(state_values, *args):
    args = wrap_inputs(args)
    values = layout.data_to_keys(state_values)
    objects = nnx.merge(graphdef, jax.tree.unflatten(layout.treedef, values))
    set_mode(objects, mode)
    trace.static_before = _static_attributes(objects)
    outputs = call_with_objects(objects, fn, args, keys)
    trace.static_after = _static_attributes(objects)
    trace.graphdef_after = nnx.graphdef(objects)
    new_values = layout.values(nnx.state(objects))
    # A Variable the function did not assign still holds the very value it was given.
    changed = [i for i, (old, new) in enumerate(zip(values, new_values, strict=True)) if old is not new]
    trace.changed[:] = changed
    for i in changed:
      _check_unchanged_type(layout.leaves[i], values[i], new_values[i])
    is_key = [layout.leaves[i].key_impl is not None for i in changed]
    updated = [new_values[i] for i in changed]
    return outputs, [jax.random.key_data(v) if key else v for v, key in zip(updated, is_key, strict=True)]

  return pure


def _check_repeatable(
  graphdef: nnx.GraphDef,
  layout: StateLayout,
  fn: Callable,
  trace: _Trace,
  keys: tuple[str, ...] | None,
  mode: str | None,
  inputs: tuple,
  wrap_inputs: Callable[[tuple], tuple],
) -> None:
  """Refuses a function whose trace changed static attributes unless tracing it again would give the same program.

  A compiled program replays its one trace; eagerly (and under ``nnx.jit``) the Python
  runs every call. Setting a mode flag (``model.eval()`` inside the function) changes
  attributes but is idempotent: traced again from the changed objects, the function
  computes the same and changes nothing more. A counter (``self.calls += 1``) is not.
  """
  changes = static_changes(trace.static_before, trace.static_after)
  if not changes:
    return
  again = _Trace()
  first = jax.make_jaxpr(_pure_function(graphdef, layout, fn, _Trace(), keys, mode, wrap_inputs))(*inputs)
  second = jax.make_jaxpr(_pure_function(trace.graphdef_after, layout, fn, again, keys, mode, wrap_inputs))(*inputs)
  if str(first) == str(second) and not static_changes(trace.static_after, again.static_after):
    return
  name = next(line.split()[3] for line in changes)  # "<verb> the attribute <name> ..."
  attr = name.rpartition(".")[2]
  raise StateMismatchError(
    f"The function {'; '.join(changes[:3])} while it is traced, and so would compute differently the next call. "
    "A compiled program replays the one trace made at export: it would never see the change (eagerly, and "
    "under nnx.jit, the Python runs every call). Hold the value in an nnx.Variable "
    f"(e.g. self.{attr} = nnx.Variable(jnp.array(0)), then self.{attr}[...] += 1), so that it is "
    "state the program updates; or, for a flag such as deterministic, set it before exporting "
    "(method(..., mode='eval'))."
  )


def _check_unchanged_type(leaf: Leaf, old: Any, new: Any) -> None:
  # A compiled State has fixed shapes and dtypes; eager NNX (and Linen) let an update change them.
  if (jnp.shape(new), jnp.result_type(new)) != (jnp.shape(old), jnp.result_type(old)):
    raise StateMismatchError(
      f"The function changes state leaf {leaf.name} ({leaf.variable_type}) from "
      f"{jnp.result_type(old)}{list(jnp.shape(old))} to {jnp.result_type(new)}{list(jnp.shape(new))}; "
      "a compiled State keeps its shapes and dtypes. Keep the update's shape (e.g. no keepdims=True), "
      "or run the model once eagerly so the state has its final shape before exporting."
    )


def boundary_inputs(args: tuple) -> tuple[tuple, Callable[[tuple], tuple]]:
  """The example inputs' shapes as they cross into IREE (typed keys as their key data), and the unwrapping.

  Raises:
    SignatureError: an input is an NNX object (nnx.Rngs, a Module), which a program cannot take.
  """
  graph_node = nnx.graph.is_graph_node
  for path, leaf in jax.tree_util.tree_flatten_with_path(args, is_leaf=graph_node)[0]:
    if graph_node(leaf):
      raise SignatureError(
        f"Input args{jax.tree_util.keystr(path)} is an {type(leaf).__name__}, an NNX object: a program's inputs "
        "are arrays. Export it as one of the objects (export({'model': model, 'rngs': rngs}, ...)) so that its "
        "state lives on the device, or pass a key (jax.random.key(0)) and build nnx.Rngs(key) inside the function."
      )
  shapes = jax.eval_shape(lambda *a: a, *args)
  flat, treedef = jax.tree.flatten(shapes)
  impls = [x.dtype._impl if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else None for x in flat]
  crossing = [jax.eval_shape(jax.random.key_data, x) if impl else x for x, impl in zip(flat, impls, strict=True)]

  def wrap_inputs(crossed: tuple) -> tuple:
    values = jax.tree.leaves(crossed)
    keys = [jax.random.wrap_key_data(v, impl=impl) if impl else v for v, impl in zip(values, impls, strict=True)]
    return jax.tree.unflatten(treedef, keys)

  return jax.tree.unflatten(treedef, crossing), wrap_inputs


def _leaves(prefix: str, tree: Any) -> tuple[Leaf, ...]:
  with_paths = jax.tree_util.tree_flatten_with_path(tree)[0]
  return tuple(
    Leaf(f"{prefix}{jax.tree_util.keystr(path)}", _shape(x.shape), np.dtype(x.dtype).name) for path, x in with_paths
  )


def _shape(shape: tuple) -> tuple[int | Dim, ...]:
  """A shape's sizes, its symbolic dimensions as Dims with the bounds JAX proves for them."""
  return tuple(d if isinstance(d, int) else Dim(str(d).replace(" ", ""), *dim_bounds(d)) for d in shape)


def _check_input_dims(args: tuple[Leaf, ...]) -> None:
  for leaf in args:
    for dim in leaf.shape:
      if isinstance(dim, Dim) and not dim.expression.isidentifier():
        raise SignatureError(
          f"Input {leaf.name} has the dimension {dim.expression}: a Program reads each symbolic dimension from "
          "an input that has it alone (b, not 2*b). Give that input its own dimension name."
        )


def lower_function(
  graphdef: nnx.GraphDef,
  state: nnx.State,
  fn: Callable,
  args: tuple,
  *,
  name: str,
  model_name: str,
  method: str | None = None,
  object_keys: tuple[str, ...] | None = None,
  target: Target | None = None,
  isolate: frozenset[int] = frozenset(),
  mode: str | None = None,
) -> Lowered:
  """Lowers ``fn(*objects, *args)`` on the objects ``graphdef`` and ``state`` describe.

  Args:
    graphdef, state: from ``nnx.split(objects)``.
    fn: called with the merged objects (a dict is spread positionally) and ``args``.
    args: example inputs (arrays or ``jax.ShapeDtypeStruct``), fixing shapes and dtypes.
    name: the function's name (names the IREE module ``jit_<name>`` and its symbols).
    model_name: the class name shown in signatures.
    method: the method name shown in signatures (default: ``name``).
    object_keys: for a dict of objects, the order in which ``fn`` takes them.
    target: apply this target's StableHLO rewrites (None: the module as JAX lowered it).
    isolate: site indices of contractions to put in dispatches of their own (see
      ``compile.rewrites._isolation.isolate_sites``; export passes those whose kernels raced or failed).
    mode: put the (first) object in this mode ('train'/'eval') before calling ``fn`` (None: as it is).

  Raises:
    StateMismatchError: ``fn`` changed a static attribute of the objects (a plain Python value) or the
      shape or dtype of a state leaf; a compiled program could not repeat that.
  """
  layout = StateLayout.of(state)
  trace = _Trace()
  shapes, wrap_inputs = boundary_inputs(args)
  pure = _pure_function(graphdef, layout, fn, trace, object_keys, mode, wrap_inputs)
  pure.__name__ = name
  inputs = (layout.flatten(state), *shapes)
  jitted = jax.jit(pure, keep_unused=True)
  if symbolic_dims(shapes):
    module, outputs, flops = _lower_symbolic(jitted, inputs)
  else:
    traced = jitted.lower(*inputs)
    flops = _flops(traced)  # before the module is rewritten in place below
    module, (outputs, _) = traced.compiler_ir("stablehlo"), traced.out_info
  _check_repeatable(graphdef, layout, fn, trace, object_keys, mode, inputs, wrap_inputs)
  changed = trace.changed
  sites = clean_for_iree(module, scope=name)
  rewrite_counts = rewrites.apply(module, target.rewrites) if target is not None else {}
  if isolate:
    rewrite_counts[rewrites.ISOLATE_CONTRACTIONS] = isolate_sites(module, name, isolate)
  mlir = module_text(module)
  main_type = _main_function_type(module)
  num_state, num_outputs = len(layout.leaves), len(main_type.results) - len(changed)
  arg_leaves = _leaves("args", list(shapes))
  _check_input_dims(arg_leaves)
  return Lowered(
    name=name,
    mlir=mlir,
    functions=embeddable_functions(module, prefix=name),
    graphdef=graphdef,
    model_name=model_name,
    method=method or name,
    state=layout,
    args=arg_leaves,
    outputs=_leaves("outputs", outputs),
    output_treedef=jax.tree.structure(outputs),
    updates=tuple(changed),
    state_types=tuple(str(t) for t in main_type.inputs[:num_state]),
    arg_types=tuple(str(t) for t in main_type.inputs[num_state:]),
    output_types=tuple(str(t) for t in main_type.results[:num_outputs]),
    sites=sites,
    target=target.name if target is not None else None,
    rewrites=rewrite_counts,
    flops=flops,
  )


def symbolic_dims(tree: Any) -> list[Any]:
  """The symbolic dimensions (``jax.export.symbolic_shape``) of the shapes in ``tree``, in order."""
  return [d for x in jax.tree.leaves(tree) for d in getattr(x, "shape", ()) if not isinstance(d, int)]


def _lower_symbolic(jitted: Any, inputs: tuple) -> tuple[Any, Any, float]:
  """The module, output shapes and flops of a function of symbolic shapes, through ``jax.export``.

  ``jax.export``'s module computes each dimension from its input's shape and checks the
  dimensions' constraints (``shape_assertion``, which ``clean_for_iree`` removes: the Program
  checks the bounds before the call). XLA's cost analysis needs concrete shapes: the flops
  are counted at the dimensions' upper bounds (or 1 where unbounded).
  """
  from jax._src.interpreters import mlir as jax_mlir  # the context JAX's own lowering uses
  from jax.extend.mlir import ir

  try:
    exported = jax.export.export(jitted, platforms=(jax.default_backend(),))(*inputs)
  except Exception as e:  # noqa: BLE001 - jax.export's errors on symbolic shapes: a user-facing message
    raise SignatureError(
      f"The function cannot be exported for symbolic shapes ({type(e).__name__}: {str(e)[:600]}). Give the "
      "dimension constraints it needs (jax.export.symbolic_shape('b', constraints=('b <= 64',))), or export a "
      "function per shape."
    ) from None
  outputs, _ = jax.tree.unflatten(exported.out_tree, exported.out_avals)
  module = ir.Module.parse(exported.mlir_module(), context=jax_mlir.make_ir_context())
  concrete = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(tuple(d if isinstance(d, int) else dim_bounds(d)[1] or 1 for d in x.shape), x.dtype),
    inputs,
  )
  return module, outputs, _flops(jitted.lower(*concrete))


def dim_bounds(dim: Any) -> tuple[int, int | None]:
  """The largest lower and smallest upper bound JAX proves for a symbolic dimension (None: no upper bound)."""

  def provable(claim: Callable[[int], Any], k: int) -> bool:
    try:
      return bool(claim(k))
    except Exception:  # noqa: BLE001 - jax's InconclusiveDimensionOperation: not decidable
      return False

  def first(holds: Callable[[int], bool], low: int, high: int) -> int:
    """The smallest k in [low, high] where ``holds`` (monotone: false, then true) is true."""
    while low < high:
      middle = (low + high) // 2
      low, high = (low, middle) if holds(middle) else (middle + 1, high)
    return low

  limit = 1 << 40
  low = first(lambda k: not provable(lambda k: dim >= k, k + 1), 1, limit)
  if not provable(lambda k: dim <= k, limit):
    return low, None
  return low, first(lambda k: provable(lambda k: dim <= k, k), low, limit)


def _flops(traced: Any) -> float:
  cost = traced.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) and cost else cost
  return float(max((cost or {}).get("flops", 0.0), 0.0))


def _main_function_type(module) -> Any:
  from jax.extend.mlir import ir

  with module.context:
    for op in module.body.operations:
      if ir.StringAttr(op.attributes["sym_name"]).value == "main":
        return ir.FunctionType(ir.TypeAttr(op.attributes["function_type"]).value)
  raise AssertionError("JAX's lowering has no @main")


def model_name_of(objects: Any) -> str:
  if isinstance(objects, dict):
    return "+".join(type(o).__name__ for o in objects.values())
  return type(objects).__name__


def lower(model: nnx.Module, /, *args: Any, method: str = "__call__", target: str | None = None) -> Lowered:
  """Lowers ``model.<method>(*args)`` with its state to StableHLO, to read before compiling.

  The model is split once; its current mode (``model.train()`` / ``model.eval()``)
  is part of the GraphDef and so of the lowered program. :func:`export` compiles it.

  Args:
    model: the NNX module.
    *args: example inputs (arrays or ``jax.ShapeDtypeStruct``), fixing shapes and dtypes.
    method: the method to lower.
    target: show the StableHLO as compiled for this target, with its rewrites
      (e.g. ``"metal"``); None shows it as JAX lowered it.

  Returns:
    The :class:`Lowered` program.

  Example:
    >>> from nnx_models import MLP
    >>> lowered = lower(MLP(2, 16, 5, rngs=nnx.Rngs(0)), jax.ShapeDtypeStruct((3, 2), "float32"))
    >>> [leaf.shape for leaf in lowered.outputs]
    [(3, 5)]
  """
  graphdef, state = nnx.split(model)
  name = f"{type(model).__name__}_{method.strip('_')}"
  model_name = type(model).__name__
  resolved = get_target(target) if target is not None else None
  return lower_function(
    graphdef, state, method_caller(method), args, name=name, model_name=model_name, method=method, target=resolved
  )
