"""Train the class-conditioned VAE on scikit-learn's 8x8 digits on the device, then generate digits.

  python docs/examples/vae_digits.py --steps 1500 --out build/vae

Training runs the compiled train step (Adam with warmup then cosine decay, global-norm
clipping, an EMA of the params beside them); the decoder, with the EMA weights, is
exported as its own program that turns (latent, class) into an image. Writes
``digits.png`` (one row per class), ``loss.png`` and the decoder artifact ``decoder/``.
"""

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, ImageDraw
from sklearn.datasets import load_digits

import compile as nnxc
from nnx_models import EMA, ConditionalVAE, vae_optimizer, vae_train_step

BATCH, SAMPLES_PER_CLASS = 64, 8


def digits() -> tuple[jax.Array, jax.Array]:
  data = load_digits()  # bundled with scikit-learn, no download
  return jnp.asarray(data.images.reshape(-1, 64) / 16.0, jnp.float32), jnp.asarray(data.target, jnp.int32)


def batches(images, labels, steps: int, seed: int = 0):
  order = np.random.default_rng(seed).permutation(len(images))
  for step in range(steps):
    index = np.take(order, np.arange(step * BATCH, (step + 1) * BATCH), mode="wrap")
    yield images[index], labels[index]


def train(steps: int, target: str = "cpu") -> tuple[dict, list[float]]:
  images, labels = digits()
  model = ConditionalVAE(rngs=nnx.Rngs(0))
  objects = {"model": model, "optimizer": vae_optimizer(model, steps=steps), "ema": EMA(model)}
  step = nnxc.function(vae_train_step, images[:BATCH], labels[:BATCH])
  program = nnxc.export(objects, {"train_step": step}, target=target).load()
  losses = [float(program.train_step(x, y)) for x, y in batches(images, labels, steps)]
  program.update(objects)
  return objects, losses


def export_decoder(objects: dict, target: str) -> nnxc.Artifact:
  """The decoder with the EMA weights, as a program: (latent, class) -> 8x8 image."""
  model = objects["model"]
  nnx.update(model, objects["ema"].averaged())
  rows = 10 * SAMPLES_PER_CLASS
  z, labels = jnp.zeros((rows, model.latent)), jnp.zeros((rows,), jnp.int32)
  return nnxc.export(model, {"generate": nnxc.method("generate", z, labels)}, target=target)


def digit_grid(images: np.ndarray, scale: int = 4) -> Image.Image:
  """10 rows (classes) of SAMPLES_PER_CLASS 8x8 images."""
  grid = images.reshape(10, SAMPLES_PER_CLASS, 8, 8).transpose(0, 2, 1, 3).reshape(80, 8 * SAMPLES_PER_CLASS)
  return Image.fromarray((np.clip(grid, 0, 1) * 255).astype(np.uint8)).resize(
    (8 * SAMPLES_PER_CLASS * scale, 80 * scale)
  )


def loss_curve(losses: list[float], size=(480, 240)) -> Image.Image:
  image = Image.new("RGB", size, "white")
  low, high = min(losses), max(losses)
  points = [
    (10 + i * (size[0] - 20) / max(1, len(losses) - 1), size[1] - 10 - (v - low) / (high - low or 1) * (size[1] - 20))
    for i, v in enumerate(losses)
  ]
  ImageDraw.Draw(image).line(points, fill="black", width=1)
  return image


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=1500)
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("build/vae"))
  parser.add_argument("--target", default="cpu", help="where to train and generate (cpu or vulkan here)")
  options = parser.parse_args(argv)
  objects, losses = train(options.steps, options.target)
  decoder = export_decoder(objects, options.target)
  options.out.mkdir(parents=True, exist_ok=True)
  decoder.save(options.out / "decoder")
  z = jax.random.normal(jax.random.key(1), (10 * SAMPLES_PER_CLASS, objects["model"].latent))
  labels = jnp.repeat(jnp.arange(10, dtype=jnp.int32), SAMPLES_PER_CLASS)
  generated = nnxc.load_program(options.out / "decoder").generate(np.asarray(z), np.asarray(labels))
  digit_grid(generated).save(options.out / "digits.png")
  loss_curve(losses).save(options.out / "loss.png")
  print(f"loss {losses[0]:.1f} -> {np.mean(losses[-50:]):.1f}; wrote {options.out}/digits.png, loss.png, decoder/")
  return 0


if __name__ == "__main__":
  sys.exit(main())
