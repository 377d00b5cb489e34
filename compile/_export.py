"""Exporting: NNX objects and the functions to run on them, compiled into one program with device-resident state.

The NNX counterpart of iree-jax's ``Program`` and iree-turbine's ``CompiledModule``,
on public JAX APIs: the objects are split once, each function is lowered as a pure
function of the whole State (with the target's StableHLO rewrites), ``_assemble``
stitches them into one IREE module whose globals hold the State, and the SPIR-V
kernels are checked for data races (see ``docs/programs.md``).
"""

import dataclasses
import re
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from ._assemble import assemble
from ._cache import CompileCache, compile_cached, toolchain_versions
from ._iree import Binary, origin_sites
from ._layout import Leaf, StateLayout
from ._lower import Lowered, dim_bounds, lower_function, method_caller, model_name_of, symbolic_dims
from ._stablehlo import check_target_support
from ._targets import Target, get_target
from .rewrites._isolation import CONTRACTIONS
from .runtime import (
  MLIR,
  Artifact,
  CompileError,
  Function,
  HazardError,
  Manifest,
  SignatureError,
  Tensor,
  Variable,
  bucket_name,
  class_path,
  device_dtype_name,
  function_name_problem,
  global_names,
  interface,
  known_variable_class,
  path_name,
  register_output_type,
  register_variable_type,
  sha256,
  unflatten_outputs,
  user_metadata,
  written_names,
)
from .spirv import find_races


@dataclasses.dataclass(frozen=True)
class Export:
  """One function to export: ``fn(*objects, *args)`` traced at the shapes and dtypes of ``args``.

  Attributes:
    fn: called with the objects (a dict of objects is spread positionally in its
      order) and the inputs; may change their state and return any pytree of arrays.
    args: example inputs (arrays or ``jax.ShapeDtypeStruct``).
    label: what it is, for manifests and reports.
    method, mode: for :func:`method`, the method and mode it calls (reports replay it eagerly).
    buckets, pad: export a function of a symbolic dimension once per size in ``buckets`` instead
      (see ``compile/runtime/_buckets.py``); ``pad``: a size between buckets runs padded in the next.
  """

  fn: Callable[..., Any]
  args: tuple
  label: str
  method: str | None = None
  mode: str | None = None
  buckets: tuple[int, ...] = ()
  pad: bool = False


def method(
  name: str = "__call__", /, *args: Any, mode: str | None = None, buckets: tuple[int, ...] = (), pad: bool = False
) -> Export:
  """Exports ``model.<name>(*args)`` of the (first) object, in ``mode`` ('train', 'eval' or as it is).

  ``mode=None`` exports the model as it is when ``export`` runs. NNX modules start in train mode
  (Dropout draws a new mask every call, BatchNorm updates its statistics), so a prediction wants
  ``mode="eval"``; ``export`` warns where a model in train mode is exported without a mode.

  ``args`` may have symbolic dimensions (``jax.export.symbolic_shape("b", constraints=("b <= 64",))``):
  the function then takes any size within the bounds. Where IREE cannot compile a dimension
  dynamically, ``buckets=(1, 8, 64)`` exports it once per size instead (``pad=True``: sizes between
  buckets run padded in the next one; only right where rows do not mix).

  Example:
    >>> functions = {"train": method("__call__", x, mode="train"), "eval": method("__call__", x, mode="eval")}
  """
  if mode not in (None, "train", "eval"):
    raise ValueError(f"mode must be 'train', 'eval' or None, not {mode!r}.")
  caller = method_caller(name)  # export puts the model in ``mode`` before the static attributes are compared

  def call(model, *others_and_inputs):
    # With a dict of objects the other objects come first; the inputs are always the last len(args).
    return caller(model, *others_and_inputs[len(others_and_inputs) - len(args) :])

  label = f"{name} ({mode})" if mode else name
  return Export(call, args, label, method=name, mode=mode, buckets=tuple(buckets), pad=pad)


def function(fn: Callable[..., Any], /, *args: Any, buckets: tuple[int, ...] = (), pad: bool = False) -> Export:
  """Exports ``fn(*objects, *args)``, e.g. a train step ``fn(model, optimizer, x, y) -> loss``.

  ``args``, ``buckets`` and ``pad`` as for :func:`method`.
  """
  return Export(fn, args, getattr(fn, "__qualname__", repr(fn)), buckets=tuple(buckets), pad=pad)


# Flags that NNX's train() and eval() set: False is train mode (Dropout draws masks, BatchNorm updates its stats).
_MODE_FLAGS = ("deterministic", "use_running_average")


def _warn_of_default_mode(objects: Any, functions: dict[str, Export]) -> None:
  """Warns where ``method(...)`` without ``mode=`` exports a model whose layers are in train mode."""
  unset = [name for name, spec in functions.items() if spec.method is not None and spec.mode is None]
  if not unset:
    return
  root = next(iter(objects.values())) if isinstance(objects, dict) else objects
  training = [
    f"{path_name(path) or type(node).__name__}.{flag}"
    for path, node in nnx.iter_graph(root)
    if nnx.graph.is_graph_node(node)
    for flag in _MODE_FLAGS
    if getattr(node, flag, None) is False
  ]
  if training:
    warnings.warn(
      f"{', '.join(unset)}: method(...) without mode= exports the model as it is, in train mode here "
      f"({', '.join(training[:3])} is False): each call draws new Dropout masks and updates BatchNorm statistics. "
      "Pass mode='eval' for predictions, or mode='train' to say that this is meant.",
      stacklevel=3,
    )


def _expand_buckets(functions: dict[str, Export]) -> dict[str, Export]:
  """Each function exported with ``buckets`` as one static function per size (``eval__b8``)."""
  expanded = {}
  for name, spec in functions.items():
    if not spec.buckets:
      expanded[name] = spec
      continue
    dims = symbolic_dims(spec.args)
    symbols = {str(dim) for dim in dims}
    if len(symbols) != 1 or not next(iter(symbols)).isidentifier() or len(set(spec.buckets)) < 2:
      raise SignatureError(
        f"functions[{name!r}]: buckets= needs inputs with one symbolic dimension (found {sorted(symbols)}) and at "
        f"least two sizes (got {spec.buckets})."
      )
    low, high = dim_bounds(dims[0])
    symbol = symbols.pop()
    for size in sorted(set(spec.buckets)):
      if size < low or (high is not None and size > high):
        raise SignatureError(f"functions[{name!r}]: bucket {size} is outside the bounds [{low}, {high}] of {symbol}.")
      expanded[bucket_name(name, size, spec.pad)] = dataclasses.replace(
        spec, args=_with_size(spec.args, symbol, size), label=f"{spec.label} [{symbol}={size}]", buckets=()
      )
  return expanded


def _with_size(args: tuple, symbol: str, size: int) -> tuple:
  def concrete(x: Any) -> Any:
    if not isinstance(x, jax.ShapeDtypeStruct):
      return x
    return jax.ShapeDtypeStruct(tuple(size if str(d) == symbol else d for d in x.shape), x.dtype)

  return jax.tree.map(concrete, args)


def graphdef_fingerprint(objects: Any, layout: StateLayout) -> str:
  """sha256 of the object graph's structure (node paths and types) and the State layout; values excluded."""
  nodes = [[path_name(path), type(node).__qualname__] for path, node in nnx.iter_graph(objects)]
  leaves = [dataclasses.astuple(leaf) for leaf in layout.leaves]
  return sha256(repr((sorted(nodes), leaves)).encode())


def output_structure(treedef: Any) -> dict[str, Any]:
  """A JSON description of a return value's structure that the runtime rebuilds (see ``runtime/_pytrees.py``).

  nnx.State (by path), Variables, dicts, NamedTuples and registered dataclasses keep their type;
  their classes are registered so that this process's Programs return them. A pytree the runtime
  could not rebuild as itself (another custom node, a dataclass with static fields) comes back as a
  dict of its children, with a warning.
  """
  example = jax.tree.unflatten(treedef, list(range(treedef.num_leaves)))
  structure = _encode(example, typed=True)
  try:
    rebuilt = unflatten_outputs(structure, list(range(treedef.num_leaves)), known_variable_class)
    same = jax.tree.structure(rebuilt) == treedef
  except Exception:  # noqa: BLE001 - a user's class whose constructor refuses its own fields
    same = False
  if same:
    return structure
  warnings.warn(
    f"A program cannot rebuild this return value as its own type ({str(treedef):.200}); it returns the "
    "parts that are not a tuple, list, dict, nnx.State, NamedTuple or plain dataclass as dicts of their children.",
    stacklevel=4,
  )
  return _encode(example, typed=False)


def _encode(node: Any, typed: bool) -> dict[str, Any]:
  """The structure of ``node``, a return value whose leaves are their indices."""
  if isinstance(node, int) and not isinstance(node, bool):
    return {"leaf": node}
  if node is None:
    return {"none": None}
  if type(node) in (tuple, list):
    return {type(node).__name__: [_encode(item, typed) for item in node]}
  if type(node) is dict and all(isinstance(key, str) for key in node):
    return {"dict": [[key, _encode(value, typed)] for key, value in node.items()]}
  if isinstance(node, nnx.State):
    return {"state": [[list(path), _encode(value, typed)] for path, value in nnx.to_flat_state(node)]}
  if isinstance(node, nnx.Variable):
    register_variable_type(type(node))
    value = _encode(node.get_value(), typed)
    return {"variable": {"class": class_path(type(node)), "type": type(node).__name__, "value": value}}
  children = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)[0]
  named = [(getattr(key, "name", None), child) for (key,), child in children]
  kind = None
  if isinstance(node, tuple) and hasattr(type(node), "_fields"):
    kind = "namedtuple"
  elif dataclasses.is_dataclass(node):
    kind = "dataclass"
  if typed and kind and all(isinstance(name, str) for name, _ in named):
    register_output_type(type(node))
    content = [[name, _encode(child, typed)] for name, child in named]
    return {kind: {"class": class_path(type(node)), "fields": content}}
  return {"dict": [[jax.tree_util.keystr((key,)), _encode(child, typed)] for (key,), child in children]}


def _tensor(leaf: Leaf, target: Target) -> Tensor:
  return Tensor(leaf.name, leaf.shape, leaf.dtype, device_dtype_name(leaf.dtype, target.demote_f64))


def _variables(state: nnx.State, layout: StateLayout, names: list[str], target: Target) -> tuple[Variable, ...]:
  variables = []
  for (path, variable), leaf, name in zip(nnx.to_flat_state(state), layout.leaves, names, strict=True):
    plain = not isinstance(variable, nnx.Variable)  # an array attribute marked nnx.data
    if not plain:
      register_variable_type(type(variable))  # what the user exports, this process may rebuild
    metadata = {} if plain else user_metadata(variable.get_metadata())
    variables.append(
      Variable(
        **vars(_tensor(leaf, target)),
        path=tuple(path),
        variable_type=leaf.variable_type,
        variable_class="" if plain else class_path(type(variable)),
        global_name=name,
        metadata={k: v for k, v in metadata.items() if re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", k)},
        key_impl=leaf.key_impl,
      )
    )
  return tuple(variables)


def _executables_by_function(dispatches: tuple[str, ...], functions: list[str]) -> dict[str, tuple[str, ...]]:
  # IREE names each executable after the function it came from: <function>_dispatch_<n>.
  owners = sorted(functions, key=len, reverse=True)
  grouped = {name: [] for name in functions}
  for dispatch in dispatches:
    owner = next((name for name in owners if dispatch.startswith(f"{name}_dispatch_")), None)
    if owner is not None:
      grouped[owner].append(dispatch)
  return {name: tuple(each) for name, each in grouped.items()}


def _check_names(functions: dict[str, Export]) -> None:
  if not functions:
    raise ValueError("export needs at least one function, e.g. {'eval': method('__call__', x, mode='eval')}.")
  for name, spec in functions.items():
    problem = function_name_problem(name) if isinstance(name, str) else "must be a string"
    if problem:
      raise ValueError(f"Function name {name!r} {problem}; choose another, e.g. {name}_step.")
    if not isinstance(spec, Export):
      raise TypeError(f"functions[{name!r}] is a {type(spec).__name__}; wrap it with method(...) or function(...).")


def _cache_of(cache: bool | str | CompileCache | None) -> CompileCache | None:
  if cache is True:
    return CompileCache()
  if cache in (False, None):
    return None
  return cache if isinstance(cache, CompileCache) else CompileCache(cache)


def _races(binary: Binary) -> dict[str, list]:
  found = {kernel: find_races(spirv) for kernel, spirv in binary.spirv.items()}
  return {kernel: races for kernel, races in found.items() if races}


def _contractions_of(origins: dict[str, list[tuple[str, int]]], lowered: dict[str, Lowered]) -> dict[str, set[int]]:
  """``{function: site indices}`` of the contractions some kernels were formed from (``origins`` by kernel)."""
  chosen: dict[str, set[int]] = {}
  for tags in origins.values():
    for scope, index in tags:
      if scope in lowered and index < len(lowered[scope].sites) and lowered[scope].sites[index].op in CONTRACTIONS:
        chosen.setdefault(scope, set()).add(index)
  return chosen


def _widen(isolate: dict[str, set[int]], more: dict[str, set[int]]) -> bool:
  """Adds ``more`` to ``isolate``; whether that added anything."""
  added = False
  for scope, indices in more.items():
    added |= not indices <= isolate.get(scope, set())
    isolate.setdefault(scope, set()).update(indices)
  return added


def _hazard_error(binary: Binary, target: Target, racy: dict[str, list], lowered: dict[str, Lowered]) -> HazardError:
  sites = {name: each.sites for name, each in lowered.items()}
  lines = [
    f"{len(racy)} kernel(s) compiled for {target.name!r} may race (a load of memory another invocation "
    "stored to, with no barrier in between):"
  ]
  for kernel, races in racy.items():
    origin = "; ".join(dict.fromkeys(site.describe() for site in origin_sites(binary, kernel, sites)))
    lines += [f"  {kernel}, formed from {origin or 'unknown ops'}:", *(f"    {race.describe()}" for race in races)]
  lines.append(
    "This is an IREE code generation bug that nnx-metal's rewrites did not prevent. Please report it with "
    "the function's StableHLO (compile.lower(..., target=...).mlir). export(..., check_hazards=False) builds "
    "it anyway: its results on a GPU may then be wrong."
  )
  kernels = {kernel: [race.describe() for race in races] for kernel, races in racy.items()}
  return HazardError(target.name, "\n".join(lines), kernels)


def export(
  objects: Any,
  functions: dict[str, Export],
  *,
  target: str | Target = "cpu",
  metal_platform: str = "macos",
  cuda_arch: str = "sm_80",
  vulkan_target: str | None = None,
  extra_flags: tuple[str, ...] = (),
  cache: bool | str | CompileCache | None = True,
  check_hazards: bool = True,
) -> Artifact:
  """Compiles ``functions`` of ``objects`` into one program whose state lives on the device.

  Every state leaf becomes a device global initialized from the artifact's
  parameter archive; each function reads the globals, runs, and writes back the
  leaves it changed. Only its own inputs and outputs cross to the host.

  Args:
    objects: an ``nnx.Module``, or a dict of NNX objects such as
      ``{"model": model, "optimizer": optimizer}`` (state paths then start with the keys).
    functions: ``{name: method(...) | function(...)}``; each becomes a program function.
    target: ``metal``, ``metal-vulkan`` (Metal's code generation on a Vulkan
      driver), ``vulkan``, ``cpu`` or ``cuda``.
    metal_platform, cuda_arch, vulkan_target: see :func:`compile.get_target`.
    extra_flags: more iree-compile flags, appended.
    cache: True for the default compile cache (``$NNX_METAL_CACHE`` or
      ``~/.cache/nnx-metal``), a directory or CompileCache, or False for none.
    check_hazards: check every SPIR-V kernel for data races (see ``compile/spirv/_hazards.py``).

  Returns:
    The :class:`Artifact`: ``.load()`` runs it here, ``.save(directory)`` ships it.

  Raises:
    UnsupportedOpError: an op or type the target cannot compile, found before compiling.
    CompileError: iree-compile failed (names the StableHLO op and Python line).
    HazardError: a SPIR-V kernel may race (names the kernel, the op and the line).
  """
  _check_names(functions)
  _warn_of_default_mode(objects, functions)
  functions = _expand_buckets(functions)
  target = get_target(target, metal_platform=metal_platform, cuda_arch=cuda_arch, vulkan_target=vulkan_target)
  graphdef, state = nnx.split(objects)
  layout = StateLayout.of(state)
  variables = _variables(state, layout, global_names([leaf.name for leaf in layout.leaves]), target)
  model_name = model_name_of(objects)
  program = _Program(
    graphdef=graphdef,
    state=state,
    layout=layout,
    variables=variables,
    functions=functions,
    model_name=model_name,
    # IREE names each kernel dump <module>_<function>_dispatch_<n>_<ops> and silently skips one longer than the
    # file system allows, which the race check would then never see; a dict of many objects has a long name.
    module_name=re.sub(r"\W", "_", model_name).lower()[:32],
    object_keys=tuple(objects) if isinstance(objects, dict) else None,
  )
  try:
    build = _compile(program, target, tuple(extra_flags), _cache_of(cache), check_hazards)
  except CompileError as error:
    if any(symbolic_dims(spec.args) for spec in functions.values()):
      error.args = (
        f"{error.args[0]}\nIREE could not compile a symbolic dimension of this program. Export the function "
        "once per size instead: compile.method(..., buckets=(1, 8, 32)) (see docs/symbolic-shapes.md).",
      )
    raise
  manifest = _manifest(
    objects=objects, layout=layout, target=build.target, build=build, variables=variables, hazards_checked=check_hazards
  )
  files = {**build.binary.files(), MLIR: build.mlir.encode()}
  params = {v.global_name: np.asarray(value) for v, value in zip(variables, layout.flatten(state), strict=True)}
  return Artifact(manifest, files, params, from_cache=build.cached)


@dataclasses.dataclass(frozen=True)
class _Program:
  """What export compiles: the split objects, their state variables and the functions to lower."""

  graphdef: Any
  state: nnx.State
  layout: StateLayout
  variables: tuple[Variable, ...]
  functions: dict[str, Export]
  model_name: str
  module_name: str
  object_keys: tuple[str, ...] | None

  def lower(self, target: Target, isolate: dict[str, set[int]]) -> dict[str, Lowered]:
    """Every function lowered for ``target``, with the contractions ``isolate`` names in kernels of their own."""
    lowered = {
      name: lower_function(
        self.graphdef,
        self.state,
        spec.fn,
        spec.args,
        name=name,
        model_name=self.model_name,
        method=spec.label,
        object_keys=self.object_keys,
        target=target,
        isolate=frozenset(isolate.get(name, ())),
        mode=spec.mode,
      )
      for name, spec in self.functions.items()
    }
    for each in lowered.values():
      check_target_support(each.sites, target)
    return lowered


@dataclasses.dataclass(frozen=True)
class _Build:
  """One compile of a program: what was lowered, the MLIR, what iree-compile made of it, the functions' interface."""

  target: Target
  lowered: dict[str, Lowered]
  specs: dict[str, Function]
  mlir: str
  binary: Binary
  cached: bool


# Compiles at most: the first, then with more ops isolated each time.
_ATTEMPTS = 4


def _compile(
  program: _Program, target: Target, extra_flags: tuple[str, ...], cache: CompileCache | None, check_hazards: bool
) -> _Build:
  """Compiles ``program``, retrying where IREE's code generation fails or races.

  The policy: a program iree-compile fails to compile with the target's optional
  optimizations (the cpu target's data tiling) is compiled again without them. A
  kernel that races, or that still fails to compile, is compiled again with the
  matrix products and reductions it was formed from in kernels of their own, up to
  ``_ATTEMPTS`` compiles. A race that remains is a HazardError.
  """
  isolate: dict[str, set[int]] = {}
  for attempt in range(_ATTEMPTS):
    last = attempt + 1 == _ATTEMPTS
    lowered = program.lower(target, isolate)
    specs = _function_specs(program.functions, lowered, program.layout, target)
    globals_ = [v.global_name for v in program.variables]
    names = written_names([v.name for v in program.variables], specs.values(), target.runtime)
    written = [i for i, v in enumerate(program.variables) if v.name in names]
    mlir = assemble(program.module_name, lowered, globals_, interface(program.variables, specs), written=written)
    sites = {name: each.sites for name, each in lowered.items()}
    try:
      binary, cached = compile_cached(mlir, program.module_name, target, extra_flags, cache, sites)
    except CompileError as error:
      if target.speed_flags:
        target = dataclasses.replace(target, speed_flags=())
        continue
      if last or not _widen(isolate, _contractions_of(error.kernels, lowered)):
        raise
      continue
    build = _Build(target, lowered, specs, mlir, binary, cached)
    racy = _races(binary) if target.spirv and check_hazards else {}
    if not racy:
      return build
    origins = {kernel: binary.origins.get(kernel, []) for kernel in racy}
    if last or not _widen(isolate, _contractions_of(origins, lowered)):
      raise _hazard_error(binary, target, racy, lowered)
  raise AssertionError("unreachable: the last attempt returns or raises")


def _function_specs(
  functions: dict[str, Export], lowered: dict[str, Lowered], layout: StateLayout, target: Target
) -> dict[str, Function]:
  """Each function's interface (what it takes, returns and updates); what compiling says is filled in later."""
  return {
    name: Function(
      name=name,
      label=functions[name].label,
      method=functions[name].method,
      mode=functions[name].mode,
      inputs=tuple(_tensor(leaf, target) for leaf in each.args),
      outputs=tuple(_tensor(leaf, target) for leaf in each.outputs),
      structure=output_structure(each.output_treedef),
      updates=tuple(layout.leaves[i].name for i in each.updates),
      executables=(),
      dispatch_count=0,
      flops=each.flops,
    )
    for name, each in lowered.items()
  }


def _manifest(
  *,
  objects: Any,
  layout: StateLayout,
  target: Target,
  build: _Build,
  variables: tuple[Variable, ...],
  hazards_checked: bool,
) -> Manifest:
  """The manifest of a compiled program: its interface, what compiling made, and what it was built with."""
  root = next(iter(objects.values())) if isinstance(objects, dict) else objects
  binary, specs = build.binary, build.specs
  executables = _executables_by_function(binary.dispatches, list(specs))
  rewrites: dict[str, int] = {}
  for each in build.lowered.values():
    for rewrite, count in each.rewrites.items():
      rewrites[rewrite] = rewrites.get(rewrite, 0) + count
  return Manifest(
    model=class_path(type(root)),
    objects={key: class_path(type(obj)) for key, obj in objects.items()} if isinstance(objects, dict) else None,
    graphdef_fingerprint=graphdef_fingerprint(objects, layout),
    target=target.runtime,
    flags=binary.flags,
    versions=toolchain_versions(),
    compile_seconds=binary.compile_seconds,
    dispatches=binary.dispatches,
    rewrites=rewrites,
    hazard_check="not applicable" if not target.spirv else ("passed" if hazards_checked else "off"),
    state=variables,
    functions={
      # executables: named after this function (shared ones after the first user); calls: launched per call
      name: dataclasses.replace(spec, executables=executables[name], dispatch_count=binary.calls[name])
      for name, spec in specs.items()
    },
  )
