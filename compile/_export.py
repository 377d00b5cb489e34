"""Exporting: NNX objects and the functions to run on them, compiled into one program with device-resident state.

The NNX counterpart of iree-jax's ``Program`` and iree-turbine's ``CompiledModule``,
on public JAX APIs: the objects are split once, each function is lowered as a pure
function of the whole State, and ``_assemble`` stitches them into one IREE module
whose globals hold the State (see ``docs/programs.md``).
"""

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from ._artifact import FORMAT, FORMAT_VERSION, MODULE, Artifact, path_name, sha256, toolchain_versions
from ._assemble import assemble, global_names
from ._cache import CompileCache, compile_cached
from ._layout import Leaf, StateLayout
from ._lower import Lowered, lower_function, method_caller, model_name_of
from ._program import Program
from ._run import device_dtype
from ._stablehlo import check_target_support
from ._targets import Target, get_target


@dataclasses.dataclass(frozen=True)
class Function:
  """One function to export: ``fn(*objects, *args)`` traced at the shapes and dtypes of ``args``.

  Attributes:
    fn: called with the objects (a dict of objects is spread positionally in its
      order) and the inputs; may change their state and return any pytree of arrays.
    args: example inputs (arrays or ``jax.ShapeDtypeStruct``).
    label: what it is, for manifests and reports.
    method, mode: for :func:`method`, the method and mode it calls (reports replay it eagerly).
  """

  fn: Callable[..., Any]
  args: tuple
  label: str
  method: str | None = None
  mode: str | None = None


def method(name: str = "__call__", /, *args: Any, mode: str | None = None) -> Function:
  """Exports ``model.<name>(*args)`` of the (first) object, in ``mode`` ('train', 'eval' or as it is).

  Example:
    >>> functions = {"train": method("__call__", x, mode="train"), "eval": method("__call__", x, mode="eval")}
  """
  caller = method_caller(name, mode)

  def call(model, *others_and_inputs):
    # With a dict of objects the other objects come first; the inputs are always the last len(args).
    return caller(model, *others_and_inputs[len(others_and_inputs) - len(args) :])

  return Function(call, args, f"{name} ({mode})" if mode else name, method=name, mode=mode)


def function(fn: Callable[..., Any], /, *args: Any) -> Function:
  """Exports ``fn(*objects, *args)``, e.g. a train step ``fn(model, optimizer, x, y) -> loss``."""
  return Function(fn, args, getattr(fn, "__qualname__", repr(fn)))


def _class_path(obj: Any) -> str:
  cls = obj if isinstance(obj, type) else type(obj)
  return f"{cls.__module__}:{cls.__qualname__}"


def graphdef_fingerprint(objects: Any, layout: StateLayout) -> str:
  """sha256 of the object graph's structure (node paths and types) and the State layout; values excluded."""
  nodes = [[path_name(path), type(node).__qualname__] for path, node in nnx.iter_graph(objects)]
  leaves = [dataclasses.astuple(leaf) for leaf in layout.leaves]
  return sha256(repr((sorted(nodes), leaves)).encode())


def output_structure(treedef: Any) -> dict[str, Any]:
  """A JSON description of a return value's structure that ``_program.unflatten_outputs`` rebuilds without JAX."""

  def encode(node: Any) -> dict[str, Any]:
    if isinstance(node, int):
      return {"leaf": node}
    if node is None:
      return {"none": None}
    if isinstance(node, dict):
      return {"dict": [[key, encode(value)] for key, value in node.items()]}
    if isinstance(node, (tuple, list)) and type(node) in (tuple, list):
      return {type(node).__name__: [encode(item) for item in node]}
    return {"tuple": [encode(leaf) for leaf in jax.tree.leaves(node)]}  # other pytrees come back as tuples

  return encode(jax.tree.unflatten(treedef, list(range(treedef.num_leaves))))


def _leaf_entry(leaf: Leaf, target: Target) -> dict[str, Any]:
  return {
    "name": leaf.name,
    "shape": list(leaf.shape),
    "dtype": leaf.dtype,
    "device_dtype": device_dtype(leaf.dtype, target).name,
  }


def _state_entries(state: nnx.State, layout: StateLayout, names: list[str], target: Target) -> list[dict[str, Any]]:
  entries = []
  for (path, variable), leaf, name in zip(nnx.to_flat_state(state), layout.leaves, names, strict=True):
    entries.append(
      {
        **_leaf_entry(leaf, target),
        "path": list(path),
        "global": name,
        "variable_type": leaf.variable_type,
        "variable_class": _class_path(variable),
        "metadata": {k: v for k, v in variable.get_metadata().items() if isinstance(v, (str, int, float, bool))},
        "key_impl": leaf.key_impl,
      }
    )
  return entries


def _executables_by_function(dispatches: tuple[str, ...], functions: list[str]) -> dict[str, list[str]]:
  # IREE names each executable after the function it came from: <function>_dispatch_<n>.
  owners = sorted(functions, key=len, reverse=True)
  grouped = {name: [] for name in functions}
  for dispatch in dispatches:
    owner = next((name for name in owners if dispatch.startswith(f"{name}_dispatch_")), None)
    if owner is not None:
      grouped[owner].append(dispatch)
  return grouped


def _check_names(functions: dict[str, Function]) -> None:
  if not functions:
    raise ValueError("export needs at least one function, e.g. {'eval': method('__call__', x, mode='eval')}.")
  for name, spec in functions.items():
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name.startswith("nnx_"):
      raise ValueError(f"Function name {name!r} must be a Python identifier not starting with 'nnx_'.")
    if hasattr(Program, name):
      raise ValueError(f"Function name {name!r} is taken by Program.{name}; choose another, e.g. {name}_step.")
    if not isinstance(spec, Function):
      raise TypeError(f"functions[{name!r}] is a {type(spec).__name__}; wrap it with method(...) or function(...).")


def _cache_of(cache: bool | str | CompileCache | None) -> CompileCache | None:
  if cache is True:
    return CompileCache()
  if cache in (False, None):
    return None
  return cache if isinstance(cache, CompileCache) else CompileCache(cache)


def export(
  objects: Any,
  functions: dict[str, Function],
  *,
  target: str | Target = "cpu",
  metal_platform: str = "macos",
  cuda_arch: str = "sm_80",
  extra_flags: tuple[str, ...] = (),
  cache: bool | str | CompileCache | None = True,
) -> Artifact:
  """Compiles ``functions`` of ``objects`` into one program whose state lives on the device.

  Every state leaf becomes a device global initialized from the artifact's
  parameter archive; each function reads the globals, runs, and writes back the
  leaves it changed. Only its own inputs and outputs cross to the host.

  Args:
    objects: an ``nnx.Module``, or a dict of NNX objects such as
      ``{"model": model, "optimizer": optimizer}`` (state paths then start with the keys).
    functions: ``{name: method(...) | function(...)}``; each becomes a program function.
    target: ``metal``, ``cpu``, ``vulkan`` or ``cuda``.
    metal_platform, cuda_arch, extra_flags: as for :func:`compile.build`.
    cache: True for the default compile cache (``$NNX_METAL_CACHE`` or
      ``~/.cache/nnx-metal``), a directory or CompileCache, or False for none.

  Returns:
    The :class:`Artifact`: ``.load()`` runs it here, ``.save(directory)`` ships it.

  Raises:
    UnsupportedOpError, CompileError: as for :func:`compile.build`.
  """
  _check_names(functions)
  target = get_target(target, metal_platform=metal_platform, cuda_arch=cuda_arch)
  graphdef, state = nnx.split(objects)
  layout = StateLayout.of(state)
  model_name = model_name_of(objects)
  keys = tuple(objects) if isinstance(objects, dict) else None
  lowered: dict[str, Lowered] = {
    name: lower_function(
      graphdef, state, spec.fn, spec.args, name=name, model_name=model_name, method=spec.label, object_keys=keys
    )
    for name, spec in functions.items()
  }
  for each in lowered.values():
    check_target_support(each.sites, target)
  module_name = re.sub(r"\W", "_", model_name).lower()
  mlir = assemble(module_name, lowered)
  binary, cached = compile_cached(mlir, module_name, target, tuple(extra_flags), _cache_of(cache))

  names = global_names([leaf.name for leaf in layout.leaves])
  state_entries = _state_entries(state, layout, names, target)
  executables = _executables_by_function(binary.dispatches, list(functions))
  root = next(iter(objects.values())) if isinstance(objects, dict) else objects
  manifest = {
    "format": FORMAT,
    "format_version": FORMAT_VERSION,
    "model": _class_path(root),
    "objects": {key: _class_path(obj) for key, obj in objects.items()} if isinstance(objects, dict) else None,
    "graphdef_fingerprint": graphdef_fingerprint(objects, layout),
    "target": {"name": target.name, "backend": target.backend, "drivers": list(target.drivers)},
    "flags": list(binary.flags),
    "versions": toolchain_versions(),
    "compile_seconds": binary.compile_seconds,
    "dispatches": list(binary.dispatches),
    "state": state_entries,
    "functions": {
      name: {
        "label": functions[name].label,
        "method": functions[name].method,
        "mode": functions[name].mode,
        "inputs": [_leaf_entry(leaf, target) for leaf in each.args],
        "outputs": [_leaf_entry(leaf, target) for leaf in each.outputs],
        "structure": output_structure(each.output_treedef),
        "updates": [layout.leaves[i].name for i in each.updates],
        "executables": executables[name],  # named after this function; shared ones after the first user
        "dispatch_count": binary.calls[name],  # dispatches this function launches per call
      }
      for name, each in lowered.items()
    },
  }
  files = {MODULE: binary.vmfb, "module.mlir": mlir.encode()}
  files |= {f"msl/{name}.metal": source.encode() for name, source in binary.msl.items()}
  values = layout.flatten(state)
  params = {
    entry["global"]: np.asarray(value).astype(entry["device_dtype"])
    for entry, value in zip(state_entries, values, strict=True)
  }
  return Artifact(manifest, files, params, from_cache=cached)
