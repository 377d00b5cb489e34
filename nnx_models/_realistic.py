"""Models at the sizes people train and deploy, for the realistic benchmark tier (``nox -s bench``).

Each entry builds its objects (the model and its optimizer) and the functions to
time on them with a batch of inputs: a forward pass in eval mode and a train step.
"""

import dataclasses
from collections.abc import Callable

import jax
import optax
from flax import nnx

from ._catalog import TransformerBlock


class DeepMLP(nnx.Module):
  """784 -> 1024 x 4 -> 10 with relu: an MNIST-sized classifier."""

  def __init__(self, *, rngs: nnx.Rngs, width: int = 1024, depth: int = 4):
    sizes = [784] + [width] * depth
    self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes, sizes[1:], strict=False)])
    self.out = nnx.Linear(width, 10, rngs=rngs)

  def __call__(self, x):
    for layer in self.hidden:
      x = nnx.relu(layer(x))
    return self.out(x)


class Transformer(nnx.Module):
  """Two pre-LayerNorm transformer blocks (causal self-attention, gelu MLP, Dropout) and a 10-way head."""

  def __init__(self, *, rngs: nnx.Rngs, features: int = 256, heads: int = 4, blocks: int = 2):
    self.blocks = nnx.List([TransformerBlock(features, heads, rngs=rngs) for _ in range(blocks)])
    self.norm = nnx.LayerNorm(features, rngs=rngs)
    self.head = nnx.Linear(features, 10, rngs=rngs)

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x).mean(axis=1))


class ConvNet(nnx.Module):
  """Three Conv -> BatchNorm -> relu stages (32, 64 and 128 features, the last two strided) and a linear head."""

  def __init__(self, *, rngs: nnx.Rngs):
    widths, strides = [3, 32, 64, 128], [1, 2, 2]
    pairs = zip(widths, widths[1:], strides, strict=False)
    self.convs = nnx.List([nnx.Conv(a, b, (3, 3), strides=s, use_bias=False, rngs=rngs) for a, b, s in pairs])
    self.norms = nnx.List([nnx.BatchNorm(b, rngs=rngs) for b in widths[1:]])
    self.head = nnx.Linear(widths[-1], 10, rngs=rngs)

  def __call__(self, x):
    for conv, norm in zip(self.convs, self.norms, strict=True):
      x = nnx.relu(norm(conv(x)))
    return self.head(x.mean(axis=(1, 2)))


def train_step(model, optimizer, x, labels):
  """One AdamW step on the softmax cross-entropy, in train mode; returns the loss."""
  model.train()

  def loss_fn(model):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def forward(model, optimizer, x):
  """The model in eval mode (what a deployment runs)."""
  model.eval()
  return model(x)


@dataclasses.dataclass(frozen=True)
class RealisticEntry:
  """One realistic benchmark model.

  Attributes:
    name: short name.
    objects: builds its objects (``{"model": ..., "optimizer": ...}``) from a fixed seed.
    calls: ``{function name: (fn(*objects, *inputs), inputs)}``: a forward pass in eval
      mode and a train step, with a batch of inputs.
  """

  name: str
  objects: Callable[[], dict]
  calls: Callable[[], dict[str, tuple[Callable, tuple]]]


def _with_adamw(make: Callable[[nnx.Rngs], nnx.Module]) -> Callable[[], dict]:
  def objects() -> dict:
    model = make(nnx.Rngs(0))
    return {"model": model, "optimizer": nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)}

  return objects


def _classifier_calls(*shape: int) -> Callable[[], dict[str, tuple[Callable, tuple]]]:
  def calls() -> dict[str, tuple[Callable, tuple]]:
    x = jax.random.normal(jax.random.key(0), shape)
    labels = jax.random.randint(jax.random.key(1), (shape[0],), 0, 10)
    return {"forward": (forward, (x,)), "train_step": (train_step, (x, labels))}

  return calls


def _vae_objects() -> dict:
  from ._vae import EMA, ConditionalVAE, vae_optimizer

  model = ConditionalVAE(rngs=nnx.Rngs(0))
  return {"model": model, "optimizer": vae_optimizer(model, steps=1000), "ema": EMA(model)}


def _vae_calls() -> dict[str, tuple[Callable, tuple]]:
  from ._vae import vae_train_step

  images = jax.random.uniform(jax.random.key(0), (64, 64))
  labels = jax.random.randint(jax.random.key(1), (64,), 0, 10)
  return {"train_step": (vae_train_step, (images, labels))}


REALISTIC: dict[str, RealisticEntry] = {
  entry.name: entry
  for entry in [
    RealisticEntry("mlp_784_1024x4", _with_adamw(lambda r: DeepMLP(rngs=r)), _classifier_calls(256, 784)),
    RealisticEntry("transformer_2x256", _with_adamw(lambda r: Transformer(rngs=r)), _classifier_calls(8, 128, 256)),
    RealisticEntry("convnet_32x32", _with_adamw(lambda r: ConvNet(rngs=r)), _classifier_calls(32, 32, 32, 3)),
    RealisticEntry("vae_digits", _vae_objects, _vae_calls),
  ]
}
