"""The `nox -s metal` job: compile every zoo model for a target into build/<target>/<model>/.

Run as ``python -m compile.build_zoo --target metal --out build/metal``. Each model
is built in train and eval mode (``call_train``/``call_eval``), and exported as a
program artifact (``program/``: both modes sharing one device-resident state, with
``params.irpa`` and ``manifest.json``). Where the target's device exists (a Mac for
``metal``), each build is also run and checked against eager NNX.
"""

import argparse
import pathlib
import sys

import jax
import numpy as np
from flax import nnx

from nnx_models import ZOO, ZooEntry

from ._build import Compiled, build
from ._errors import DeviceUnavailableError
from ._export import export, function, method
from ._lower import lower
from ._run import load

BATCH = 8
PARITY_ATOL = 1e-4
PARITY_RTOL = 1e-4


def _build_one(entry: ZooEntry, mode: str, target: str, out: pathlib.Path) -> Compiled:
  model = entry.make(0)
  getattr(model, mode)()
  compiled = build(lower(model, *entry.example_args(BATCH, 0)), target)
  compiled.save(out / entry.name / f"call_{mode}")
  return compiled


def _parity_error(entry: ZooEntry, mode: str, compiled: Compiled) -> float:
  """Max abs error of outputs and state after one call, compiled against eager."""
  executable = load(compiled)
  model = entry.make(0)
  getattr(model, mode)()
  args = entry.example_args(BATCH, 1)
  got = executable(nnx.state(model), *args)
  want = (model(*args), nnx.state(model))
  errors = jax.tree.map(
    lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0)),
    jax.tree.map(_comparable, got),
    jax.tree.map(_comparable, want),
  )
  return max(jax.tree.leaves(errors), default=0.0)


def _comparable(x):
  return jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x


def _export_program(entry: ZooEntry, target: str, out: pathlib.Path) -> None:
  args = entry.example_args(BATCH, 0)
  functions = {mode: method("__call__", *args, mode=mode) for mode in ("train", "eval")}
  artifact = export(entry.make(0), functions, target=target)
  artifact.save(out / entry.name / "program")
  counts = ", ".join(f"{name} {spec['dispatch_count']}" for name, spec in artifact.functions.items())
  print(f"{entry.name:<20}{'program':<13}  dispatches: {counts}; {len(artifact.params)} state globals")


def _export_linen(target: str, out: pathlib.Path) -> None:
  """The Linen models of the Flax guides, through nnx.bridge, as program artifacts."""
  import flax.linen as nn
  import jax.numpy as jnp

  from nnx_models import CNN, BiasAdderWithRunningMean, ExplicitMLP, SimpleDense, SimpleMLP, to_nnx

  x, images = jnp.ones((BATCH, 4)), jnp.ones((BATCH, 8, 8, 1))
  running_mean = to_nnx(BiasAdderWithRunningMean(), x)
  running_mean(x, mutable=["batch_stats"])  # its first update fixes the running mean's shape
  models = {
    "linen_dense_regression": (to_nnx(nn.Dense(5), x), x),
    "linen_explicit_mlp": (to_nnx(ExplicitMLP([3, 4, 5]), x), x),
    "linen_simple_mlp": (to_nnx(SimpleMLP([3, 4, 5]), x), x),
    "linen_simple_dense": (to_nnx(SimpleDense(3), x), x),
    "linen_cnn": (to_nnx(CNN(), images), images),
  }
  for name, (model, example) in models.items():
    artifact = export(model, {"apply": method("__call__", example)}, target=target)
    artifact.save(out / name / "program")
    print(f"{name:<24}{'program':<13}  dispatches: apply {artifact.functions['apply']['dispatch_count']}")
  step = function(lambda model, x: model(x, mutable=["batch_stats"]), x)
  artifact = export(running_mean, {"apply_mutable": step}, target=target)
  artifact.save(out / "linen_running_mean" / "program")
  count = artifact.functions["apply_mutable"]["dispatch_count"]
  print(f"{'linen_running_mean':<24}{'program':<13}  dispatches: apply_mutable {count}")


def _export_vae(target: str, out: pathlib.Path) -> None:
  """The class-conditioned VAE: its train step and its decoder ((latent, class) -> image)."""
  import jax.numpy as jnp

  from nnx_models import EMA, ConditionalVAE, vae_optimizer, vae_train_step

  model = ConditionalVAE(rngs=nnx.Rngs(0))
  objects = {"model": model, "optimizer": vae_optimizer(model, steps=1000), "ema": EMA(model)}
  images, labels = jnp.zeros((64, 64)), jnp.zeros((64,), jnp.int32)
  artifacts = {
    "vae_train": export(objects, {"train_step": function(vae_train_step, images, labels)}, target=target),
    "vae_decoder": export(
      model, {"generate": method("generate", jnp.zeros((80, 8)), labels[:1].repeat(80))}, target=target
    ),
  }
  for name, artifact in artifacts.items():
    artifact.save(out / name / "program")
    counts = ", ".join(f"{f} {spec['dispatch_count']}" for f, spec in artifact.functions.items())
    print(f"{name:<24}{'program':<13}  dispatches: {counts}")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--target", default="metal")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("build/metal"))
  parser.add_argument("--models", nargs="*", default=list(ZOO), help="zoo model names (default: all)")
  options = parser.parse_args(argv)

  header = f"{'model':<20}{'function':<13}{'dispatches':>11}{'vmfb bytes':>12}{'MSL files':>10}{'compile s':>11}  run"
  print(header, "-" * len(header), sep="\n")
  for name in options.models:
    for mode in ("train", "eval"):
      compiled = _build_one(ZOO[name], mode, options.target, options.out)
      try:
        error = _parity_error(ZOO[name], mode, compiled)
        run = f"max err {error:.2e}" + ("" if error <= PARITY_ATOL + PARITY_RTOL else "  PARITY FAILED")
      except DeviceUnavailableError:
        run = f"not run: no {options.target} device here"
      print(
        f"{name:<20}{'call_' + mode:<13}{compiled.dispatch_count:>11}{len(compiled.vmfb):>12}"
        f"{len(compiled.msl):>10}{compiled.compile_seconds:>11.2f}  {run}"
      )
    _export_program(ZOO[name], options.target, options.out)
  _export_linen(options.target, options.out)
  with jax.numpy_dtype_promotion("standard"):
    _export_vae(options.target, options.out)
  print(f"\nModules in {options.out}/<model>/call_<mode>/: module.vmfb, module.mlir, msl/, spirv/")
  print(f"Program artifacts in {options.out}/<model>/program/: manifest.json, module.vmfb, params.irpa, msl/")
  return 0


if __name__ == "__main__":
  sys.exit(main())
