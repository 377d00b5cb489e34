"""The class-conditioned VAE trains on the device like eager NNX; partial fine-tuning; the example writes its grid."""

import importlib.util
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import compile as nnxc
from nnx_models import EMA, ConditionalVAE, vae_optimizer, vae_train_step
from tests.conftest import RUNNABLE, assert_trees_allclose, require_device

EXAMPLE = pathlib.Path(__file__).parent.parent / "docs" / "examples" / "vae_digits.py"
BATCH = 32


def _example():
  spec = importlib.util.spec_from_file_location("vae_digits", EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _objects(wrt=nnx.Param) -> dict:
  model = ConditionalVAE(rngs=nnx.Rngs(0))
  return {"model": model, "optimizer": vae_optimizer(model, steps=20, wrt=wrt), "ema": EMA(model)}


def _batch(step: int):
  images, labels = _example().digits()
  start = step * BATCH
  return images[start : start + BATCH], labels[start : start + BATCH]


@pytest.mark.parametrize("target", RUNNABLE)
@pytest.mark.usefixtures("standard_dtype_promotion")
def test_compiled_vae_training_matches_eager(target):
  require_device(target)
  x, y = _batch(0)
  program = nnxc.export(_objects(), {"train_step": nnxc.function(vae_train_step, x, y)}, target=target).load()
  eager = _objects()
  for step in range(5):
    x, y = _batch(step)
    np.testing.assert_allclose(program.train_step(x, y), vae_train_step(*eager.values(), x, y), rtol=1e-5)
  # Params, Adam moments, the schedule's step count, the EMA and the noise RNG count.
  assert_trees_allclose(program.state(), nnx.state(eager), rtol=1e-4, atol=1e-5)


@pytest.mark.usefixtures("standard_dtype_promotion")
def test_fine_tuning_only_the_decoder_leaves_the_encoder_untouched():
  decoder_only = nnx.All(nnx.Param, nnx.PathContains("decoder"))
  x, y = _batch(0)
  objects = _objects(wrt=decoder_only)
  encoder_before = nnx.state(objects["model"].encoder)
  program = nnxc.export(objects, {"train_step": nnxc.function(vae_train_step, x, y)}).load()
  eager = _objects(wrt=decoder_only)
  for step in range(4):
    x, y = _batch(step)
    np.testing.assert_allclose(program.train_step(x, y), vae_train_step(*eager.values(), x, y), rtol=1e-5)
  trained = program.state()["model"]
  assert_trees_allclose(trained["encoder"], encoder_before, rtol=0, atol=0)
  assert not np.allclose(
    trained["decoder"]["out"]["kernel"].get_value(), objects["model"].decoder.out.kernel.get_value()
  )
  assert_trees_allclose(trained, nnx.state(eager["model"]), rtol=1e-4, atol=1e-5)
  assert "encoder" not in str(nnx.to_pure_dict(nnx.state(objects["optimizer"]))["opt_state"])  # no moments for it


@pytest.mark.usefixtures("standard_dtype_promotion")
def test_the_example_trains_exports_the_decoder_and_writes_its_grid(tmp_path):
  assert _example().main(["--steps", "200", "--out", str(tmp_path)]) == 0
  grid = Image.open(tmp_path / "digits.png")
  assert grid.size == (8 * 8 * 4, 10 * 8 * 4)  # one row per class, 8 samples, 4x scale
  assert Image.open(tmp_path / "loss.png").size == (480, 240)
  decoder = nnxc.load_program(tmp_path / "decoder")
  z = np.zeros((80, 8), np.float32)
  images = decoder.generate(z, np.repeat(np.arange(10, dtype=np.int32), 8))
  assert images.shape == (80, 64) and 0.0 <= images.min() and images.max() <= 1.0
  assert not np.allclose(images[0], images[-1])  # class 0 and class 9 differ


def test_the_decoder_compiles_for_metal():
  model = ConditionalVAE(rngs=nnx.Rngs(0))
  z, labels = jnp.zeros((80, 8)), jnp.zeros((80,), jnp.int32)
  artifact = nnxc.export(model, {"generate": nnxc.method("generate", z, labels)}, target="metal")
  assert artifact.functions["generate"].dispatch_count >= 1
  assert any(name.startswith("msl/") for name in artifact.files)
