"""The `nox -s metal` job: export every zoo, catalog, Linen and VAE model for a target into build/<target>/<model>/.

Run as ``python -m nnx_models.tools.build_zoo --target metal --out build/metal``. Each model
is one program artifact (``manifest.json``, ``module.vmfb``, ``params.irpa``,
``module.mlir``, ``msl/`` and ``spirv/`` per kernel), built with the SPIR-V
rewrites and checked for kernel races. Where the target's device exists (a Mac for
``metal``; lavapipe for ``metal-vulkan`` and ``vulkan``), each zoo program also runs
and is compared with eager NNX.

A second run with nothing changed reuses what the first wrote: each artifact is stamped
with a digest of what it is built from (the source of ``compile`` and ``nnx_models``,
the toolchain versions, the target and the model's name), and an artifact whose stamp
matches is opened and verified instead of exported again.
"""

import argparse
import hashlib
import importlib.metadata
import json
import pathlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import compile as nnxc
import nnx_models
from compile import (
  Artifact,
  ArtifactError,
  CompileError,
  DeviceUnavailableError,
  Export,
  Target,
  export,
  function,
  get_target,
  method,
)
from nnx_models import CATALOG, ZOO, CatalogEntry

BATCH = 8
PARITY_TOLERANCE = 1e-4  # normwise: max|a - b| <= tol * (1 + max|b|)


# Each model: (name, its objects, its functions); both made only when it is exported (example inputs cost an XLA
# compile each, which a second run that reuses every artifact need not pay).
Build = tuple[str, Callable[[], Any], Callable[[], dict[str, Export]]]


def _zoo() -> Iterator[Build]:
  def functions(entry):
    args = entry.example_args(BATCH, 0)
    return {m: method("__call__", *args, mode=m) for m in ("train", "eval")}

  for entry in ZOO.values():
    yield entry.name, lambda entry=entry: entry.make(0), lambda entry=entry: functions(entry)


def catalog_functions(entry: CatalogEntry) -> dict[str, Export]:
  """The exports of a catalog entry, traced at the inputs of its first step."""
  return {name: function(fn, *entry.inputs(name, 0)) for name, fn in entry.calls.items()}


def _catalog() -> Iterator[Build]:
  for entry in CATALOG.values():
    yield f"catalog_{entry.name}", entry.objects, lambda entry=entry: catalog_functions(entry)


def _linen() -> Iterator[Build]:
  """The Linen models of the Flax guides, through nnx.bridge."""
  import flax.linen as nn

  from nnx_models import CNN, BiasAdderWithRunningMean, ExplicitMLP, SimpleDense, SimpleMLP, to_nnx

  x, images = jnp.ones((BATCH, 4)), jnp.ones((BATCH, 8, 8, 1))
  models = {
    "linen_dense_regression": (lambda: to_nnx(nn.Dense(5), x), x),
    "linen_explicit_mlp": (lambda: to_nnx(ExplicitMLP([3, 4, 5]), x), x),
    "linen_simple_mlp": (lambda: to_nnx(SimpleMLP([3, 4, 5]), x), x),
    "linen_simple_dense": (lambda: to_nnx(SimpleDense(3), x), x),
    "linen_cnn": (lambda: to_nnx(CNN(), images), images),
  }
  for name, (make, example) in models.items():
    yield name, make, lambda example=example: {"apply": method("__call__", example)}

  def running_mean():
    model = to_nnx(BiasAdderWithRunningMean(), x)
    model(x, mutable=["batch_stats"])  # its first update fixes the running mean's shape
    return model

  apply_mutable = {"apply_mutable": function(lambda m, x: m(x, mutable=["batch_stats"]), x)}
  yield "linen_running_mean", running_mean, lambda: apply_mutable


def _vae() -> Iterator[Build]:
  """The class-conditioned VAE: its train step and its decoder ((latent, class) -> image)."""
  from nnx_models import EMA, ConditionalVAE, vae_optimizer, vae_train_step

  def objects():
    model = ConditionalVAE(rngs=nnx.Rngs(0))
    return {"model": model, "optimizer": vae_optimizer(model, steps=1000), "ema": EMA(model)}

  images, labels = jnp.zeros((64, 64)), jnp.zeros((64,), jnp.int32)
  yield "vae_train", objects, lambda: {"train_step": function(vae_train_step, images, labels)}
  decoder = {"generate": method("generate", jnp.zeros((80, 8)), labels[:1].repeat(80))}
  yield "vae_decoder", lambda: ConditionalVAE(rngs=nnx.Rngs(0)), lambda: decoder


def _comparable(tree: Any) -> list[np.ndarray]:
  leaves = jax.tree.leaves(tree)
  return [np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x) for x in leaves]


def _zoo_parity(name: str, artifact: Artifact) -> str:
  """Max normwise error of outputs and state after a train and an eval call, compiled against eager."""
  try:
    program = artifact.load()
  except DeviceUnavailableError:
    return f"not run: no {artifact.target} device here"
  model = ZOO[name].make(0)
  errors = []
  for call, mode in enumerate(("train", "eval")):
    args = ZOO[name].example_args(BATCH, call + 1)
    getattr(model, mode)()
    got, want = program.functions[mode](*[np.asarray(a) for a in args]), model(*args)
    pairs = zip(_comparable((got, program.state())), _comparable((want, nnx.state(model))), strict=True)
    errors += [
      float(np.max(np.abs(a.astype(np.float64) - b), initial=0) / (1 + np.max(np.abs(b), initial=0))) for a, b in pairs
    ]
  error = max(errors, default=0.0)
  return f"max err {error:.1e}" + ("" if error <= PARITY_TOLERANCE else "  PARITY FAILED")


def _raw_dispatches(objects: Callable[[], Any], functions: dict[str, Export], target: Target) -> dict[str, str]:
  """Dispatches per call without nnx-metal's SPIR-V rewrites (IREE as it is); "fails" where that does not build."""
  raw = Target(**{**vars(target), "rewrites": ()})
  try:
    artifact = export(objects(), functions, target=raw, check_hazards=False)
  except CompileError:
    return dict.fromkeys(functions, "fails")
  return {name: str(spec.dispatch_count) for name, spec in artifact.functions.items()}


STAMPS = ".build-stamps"  # beside the artifacts in --out: which inputs each was built from


def _sources_digest(target: Target) -> str:
  """sha256 of everything an artifact here is built from but its name: our source, the toolchain, the target."""
  digest = hashlib.sha256()
  for package in (nnxc, nnx_models):
    root = pathlib.Path(package.__file__).parent
    for path in sorted(root.rglob("*.py")):
      digest.update(f"{path.relative_to(root.parent)}\0".encode() + path.read_bytes() + b"\0")
  for name in ("jax", "jaxlib", "flax", "optax", "iree-base-compiler"):
    digest.update(f"{name}={importlib.metadata.version(name)}\0".encode())
  digest.update(json.dumps([target.name, target.flags, target.rewrites, target.speed_flags]).encode())
  return digest.hexdigest()


def _reuse(out: pathlib.Path, name: str, stamp: str) -> Artifact | None:
  """The artifact built at ``out/name`` from the same inputs, verified; None where it must be built again."""
  try:
    if json.loads((out / STAMPS / f"{name}.json").read_text()) != {"inputs": stamp}:
      return None
    return Artifact.open(out / name)
  except (OSError, ValueError, ArtifactError):
    return None


def _stamp(out: pathlib.Path, name: str, stamp: str) -> None:
  (out / STAMPS).mkdir(parents=True, exist_ok=True)
  (out / STAMPS / f"{name}.json").write_text(json.dumps({"inputs": stamp}))


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--target", default="metal")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("build/metal"))
  parser.add_argument("--only", nargs="*", help="build only these models (default: all)")
  parser.add_argument(
    "--raw-dispatches", action="store_true", help="also count dispatches without the SPIR-V rewrites (compiles twice)"
  )
  parser.add_argument("--rebuild", action="store_true", help="export every model again, even where nothing changed")
  options = parser.parse_args(argv)
  target = get_target(options.target)
  stamp = _sources_digest(target)

  raw_column = f"{'raw':>8}" if options.raw_dispatches else ""
  header = (
    f"{'model':<34}{'function':<14}{'dispatches':>11}{raw_column}{'vmfb bytes':>12}{'kernels':>9}"
    f"{'compile s':>11}  race check  run"
  )
  print(header, "-" * len(header), sep="\n")
  failed = False
  with jax.numpy_dtype_promotion("standard"):  # optax and Linen are written for JAX's default promotion
    for name, objects, make_functions in [*_zoo(), *_catalog(), *_linen(), *_vae()]:
      if options.only and name not in options.only:
        continue
      artifact = None if options.rebuild else _reuse(options.out, name, stamp)
      reused = artifact is not None
      if artifact is None:
        functions = make_functions()
        artifact = export(objects(), functions, target=target)
        artifact.save(options.out / name, overwrite=False)
        _stamp(options.out, name, stamp)
      raw = _raw_dispatches(objects, make_functions(), target) if options.raw_dispatches and target.spirv else {}
      run = _zoo_parity(name, artifact) if name in ZOO else ""
      failed |= "FAILED" in run
      for function_name, spec in artifact.functions.items():
        raw_cell = f"{raw.get(function_name, '-'):>8}" if options.raw_dispatches else ""
        seconds = "reused" if reused else f"{artifact.manifest.compile_seconds:.2f}"
        print(
          f"{name:<34}{function_name:<14}{spec.dispatch_count:>11}{raw_cell}{len(artifact.vmfb):>12}"
          f"{len(artifact.manifest.dispatches):>9}{seconds:>11}"
          f"  {artifact.manifest.hazard_check:<11} {run}"
        )
  print(
    f"\nProgram artifacts in {options.out}/<model>/: manifest.json, module.vmfb, params.irpa, module.mlir, msl/, spirv/"
  )
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
