"""Flax's layer catalog as small programs: the layers users build models from, and AdamW train steps.

Each entry is a set of functions of NNX objects with the inputs of each call; the
tests run them compiled and eagerly, call after call, and compare outputs and the
full state (``tests/test_catalog.py``); ``nox -s metal`` builds each for Metal.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

BATCH = 2


@dataclasses.dataclass(frozen=True)
class CatalogEntry:
  """One catalog program.

  Attributes:
    name: short name, also the build folder ``build/metal/catalog_<name>``.
    objects: builds fresh objects (a module or a dict of objects) from a fixed seed.
    calls: ``{function name: fn(*objects, *inputs)}``: what is exported and replayed eagerly.
    inputs: ``inputs(function name, step)``: the inputs of that call at that step.
    rtol: the normwise tolerance of comparisons with eager (float16 needs more).
    noise_gradients: state variables (by name) whose true gradient is zero, so the
      computed one is rounding noise whose sign differs between XLA and IREE; Adam
      turns it into a full step of up to the learning rate, per step, either way.
  """

  name: str
  objects: Callable[[], Any]
  calls: dict[str, Callable[..., Any]]
  inputs: Callable[[str, int], tuple]
  rtol: float = 2e-5
  noise_gradients: dict[str, float] = dataclasses.field(default_factory=dict)


def _normal(step: int, *shape: int, dtype=jnp.float32) -> jax.Array:
  return jax.random.normal(jax.random.key(1000 + step), shape).astype(dtype)


def forward(mode: str | None = None, method: str = "__call__", **kwargs) -> Callable[..., Any]:
  """``fn(model, *inputs)`` calling ``model.<method>(*inputs, **kwargs)``, in ``mode`` ('train'/'eval') if given."""

  def call(model, *inputs):
    if mode is not None:
      getattr(model, mode)()
    return getattr(model, method)(*inputs, **kwargs)

  return call


def _layer(name: str, make: Callable[[nnx.Rngs], nnx.Module], *shape: int, **kwargs) -> CatalogEntry:
  """A layer called in train and eval mode on a normal input of ``shape``."""
  calls = {"train": forward("train"), "eval": forward("eval")}
  return CatalogEntry(name, lambda: make(nnx.Rngs(0)), calls, lambda fn, step: (_normal(step, *shape),), **kwargs)


class TransformerBlock(nnx.Module):
  """Pre-LayerNorm self-attention (causal) and a gelu MLP, each with Dropout and a residual."""

  def __init__(self, features: int, heads: int, *, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(features, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(heads, features, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(features, rngs=rngs)
    self.up = nnx.Linear(features, 4 * features, rngs=rngs)
    self.down = nnx.Linear(4 * features, features, rngs=rngs)
    self.dropout = nnx.Dropout(0.1, rngs=rngs)

  def __call__(self, x):
    mask = nnx.make_causal_mask(jnp.ones(x.shape[:2]))
    x = x + self.dropout(self.attention(self.norm1(x), mask=mask))
    return x + self.dropout(self.down(nnx.gelu(self.up(self.norm2(x)))))


class ResNetBlock(nnx.Module):
  """Conv -> BatchNorm -> relu -> Conv -> BatchNorm, plus the input (a 1x1 conv where the width changes)."""

  def __init__(self, in_features: int, features: int, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(in_features, features, (3, 3), use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(features, rngs=rngs)
    self.conv2 = nnx.Conv(features, features, (3, 3), use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(features, rngs=rngs)
    self.project = nnx.Conv(in_features, features, (1, 1), use_bias=False, rngs=rngs)

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    return nnx.relu(self.bn2(self.conv2(y)) + self.project(x))


class Classifier(nnx.Module):
  """A body (ResNet block, CNN or transformer block) with a mean-pooled linear head."""

  def __init__(self, body: nnx.Module, features: int, classes: int, *, rngs: nnx.Rngs):
    self.body = body
    self.head = nnx.Linear(features, classes, rngs=rngs)

  def __call__(self, x):
    y = self.body(x)
    return self.head(y.reshape(y.shape[0], -1, y.shape[-1]).mean(axis=1))


class CNN(nnx.Module):
  """Two strided convolutions with relu: a small image classifier's body."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(3, 8, (3, 3), strides=2, rngs=rngs)
    self.conv2 = nnx.Conv(8, 16, (3, 3), strides=2, rngs=rngs)

  def __call__(self, x):
    return nnx.relu(self.conv2(nnx.relu(self.conv1(x))))


def adamw_train_step(model, optimizer, x, labels):
  """One AdamW step on the softmax cross-entropy, in train mode; returns the loss."""
  model.train()  # an eval call may have come before (the mode is part of the traced graph)

  def loss_fn(model):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


LEARNING_RATE = 1e-2


def _training(
  name: str, body: Callable[[nnx.Rngs], nnx.Module], features: int, *shape: int, noise: tuple[str, ...] = ()
) -> CatalogEntry:
  def objects():
    rngs = nnx.Rngs(0)
    model = Classifier(body(rngs), features, 4, rngs=rngs)
    tx = optax.adamw(LEARNING_RATE, weight_decay=1e-2)
    return {"model": model, "optimizer": nnx.Optimizer(model, tx, wrt=nnx.Param)}

  def inputs(fn: str, step: int) -> tuple:
    x = _normal(step, *shape)
    labels = jax.random.randint(jax.random.key(2000 + step), (shape[0],), 0, 4)
    return (x, labels) if fn == "train_step" else (x,)

  calls = {"train_step": adamw_train_step, "eval": lambda model, optimizer, x: forward("eval")(model, x)}
  return CatalogEntry(name, objects, calls, inputs, noise_gradients={path: LEARNING_RATE for path in noise})


class Pool(nnx.Module):
  """One of Flax's pooling functions as a layer."""

  def __init__(self, pool: Callable[..., jax.Array], window: tuple[int, ...], strides: tuple[int, ...], padding: str):
    self.pool, self.window, self.strides, self.padding = pool, window, strides, padding

  def __call__(self, x):
    return self.pool(x, self.window, strides=self.strides, padding=self.padding)


class Stem(nnx.Module):
  """A ResNet stem: Conv -> BatchNorm -> relu -> 3x3 max pool with stride 2 (overlapping windows)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)  # BatchNorm follows: a bias has no gradient
    self.norm = nnx.BatchNorm(8, rngs=rngs)

  def __call__(self, x):
    return nnx.max_pool(nnx.relu(self.norm(self.conv(x))), (3, 3), strides=(2, 2), padding="SAME")


class Decoder(nnx.Module):
  """Self-attention with ``decode=True``: one token per call, the key/value cache held as state."""

  def __init__(self, features: int, heads: int, length: int, *, rngs: nnx.Rngs):
    self.attention = nnx.MultiHeadAttention(heads, features, decode=True, rngs=rngs)
    self.attention.init_cache((BATCH, length, features))

  def __call__(self, token):
    return self.attention(token)


class Embedding(nnx.Module):
  """An embedding table used both ways: token ids to vectors, and vectors to logits (``attend``)."""

  def __init__(self, vocabulary: int, features: int, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocabulary, features, rngs=rngs)

  def __call__(self, ids):
    return self.embed(ids)

  def attend(self, query):
    return self.embed.attend(query)


class QuantizedInput(nnx.Module):
  """Takes int8 pixels, scales them to float32 inside."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.linear = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, pixels):
    return self.linear(pixels.astype(jnp.float32) / 127.0)


def _mlp(dtype) -> Callable[[nnx.Rngs], nnx.Module]:
  def make(rngs: nnx.Rngs) -> nnx.Module:
    layers = [nnx.Linear(8, 16, dtype=dtype, param_dtype=dtype, rngs=rngs), nnx.gelu]
    return nnx.Sequential(*layers, nnx.Linear(16, 4, dtype=dtype, param_dtype=dtype, rngs=rngs))

  return make


def _bidirectional(rngs: nnx.Rngs) -> nnx.Module:
  return nnx.Bidirectional(nnx.RNN(nnx.GRUCell(3, 5, rngs=rngs)), nnx.RNN(nnx.GRUCell(3, 5, rngs=rngs)))


def _entries() -> list[CatalogEntry]:
  def attention(rngs):
    return nnx.MultiHeadAttention(2, 8, decode=False, rngs=rngs)

  padded_calls = {"masked": lambda model, x, mask: model(x, mask=mask)}
  embed_calls = {"embed": forward(), "attend": forward(method="attend")}

  def padded_inputs(fn, step):
    x, lengths = _normal(step, BATCH, 6, 8), jnp.array([6, 3 + step % 3])
    keep = jnp.arange(6)[None, :] < lengths[:, None]
    return x, nnx.make_attention_mask(keep, keep)

  def decode_inputs(fn, step):
    return (_normal(step, BATCH, 1, 8),)

  def embed_inputs(fn, step):
    if fn == "embed":
      return (jax.random.randint(jax.random.key(step), (BATCH, 5), 0, 10),)
    return (_normal(step, BATCH, 6),)

  def pixel_inputs(fn, step):
    return (jax.random.randint(jax.random.key(step), (BATCH, 16), -127, 128).astype(jnp.int8),)

  return [
    _layer("conv_strided", lambda r: nnx.Conv(3, 4, (3, 3), strides=2, rngs=r), BATCH, 8, 8, 3),
    _layer("conv_valid", lambda r: nnx.Conv(3, 4, (3, 3), padding="VALID", rngs=r), BATCH, 6, 6, 3),
    _layer("conv_causal", lambda r: nnx.Conv(3, 4, (3,), padding="CAUSAL", rngs=r), BATCH, 10, 3),
    _layer("conv_dilated", lambda r: nnx.Conv(3, 4, (3, 3), kernel_dilation=2, rngs=r), BATCH, 8, 8, 3),
    _layer("conv_depthwise", lambda r: nnx.Conv(4, 4, (3, 3), feature_group_count=4, rngs=r), BATCH, 6, 6, 4),
    _layer("conv_grouped", lambda r: nnx.Conv(4, 8, (3, 3), feature_group_count=2, rngs=r), BATCH, 6, 6, 4),
    _layer("conv_transpose", lambda r: nnx.ConvTranspose(3, 4, (3, 3), strides=2, rngs=r), BATCH, 5, 5, 3),
    _layer("max_pool", lambda r: Pool(nnx.max_pool, (3, 3), (2, 2), "SAME"), BATCH, 8, 8, 3),
    _layer("min_pool", lambda r: Pool(nnx.min_pool, (2, 2), (1, 1), "VALID"), BATCH, 6, 6, 3),
    _layer("avg_pool", lambda r: Pool(nnx.avg_pool, (2, 2), (2, 2), "VALID"), BATCH, 8, 8, 3),
    _layer("layer_norm", lambda r: nnx.LayerNorm(8, rngs=r), BATCH, 5, 8),
    _layer("instance_norm", lambda r: nnx.InstanceNorm(4, rngs=r), BATCH, 5, 5, 4),
    _layer("rms_norm", lambda r: nnx.RMSNorm(8, rngs=r), BATCH, 5, 8),
    _layer("group_norm", lambda r: nnx.GroupNorm(8, num_groups=4, rngs=r), BATCH, 5, 8),
    _layer("batch_norm", lambda r: nnx.BatchNorm(8, rngs=r), 16, 8),
    _layer("weight_norm", lambda r: nnx.WeightNorm(nnx.Linear(6, 4, rngs=r), rngs=r), BATCH, 6),
    _layer("spectral_norm", lambda r: nnx.SpectralNorm(nnx.Linear(6, 4, rngs=r), rngs=r), BATCH, 6),
    _layer("dropout", lambda r: nnx.Dropout(0.5, rngs=r), BATCH, 6),
    _layer("prelu", lambda r: nnx.PReLU(), BATCH, 6),
    _layer("lora", lambda r: nnx.LoRA(6, 2, 4, rngs=r), BATCH, 6),
    _layer("lora_linear", lambda r: nnx.LoRALinear(6, 4, lora_rank=2, rngs=r), BATCH, 6),
    CatalogEntry("embed", lambda: Embedding(10, 6, rngs=nnx.Rngs(0)), embed_calls, embed_inputs),
    _layer("attention_causal", lambda r: _Causal(attention(r)), BATCH, 6, 8),
    CatalogEntry("attention_padding_mask", lambda: attention(nnx.Rngs(0)), padded_calls, padded_inputs),
    CatalogEntry("attention_decode", lambda: Decoder(8, 2, 4, rngs=nnx.Rngs(0)), {"decode": forward()}, decode_inputs),
    _layer("lstm", lambda r: nnx.RNN(nnx.LSTMCell(3, 5, rngs=r)), BATCH, 6, 3),
    _layer("gru", lambda r: nnx.RNN(nnx.GRUCell(3, 5, rngs=r)), BATCH, 6, 3),
    _layer("simple_cell", lambda r: nnx.RNN(nnx.SimpleCell(3, 5, rngs=r)), BATCH, 6, 3),
    _layer("optimized_lstm", lambda r: nnx.RNN(nnx.OptimizedLSTMCell(3, 5, rngs=r)), BATCH, 6, 3),
    _layer("bidirectional", _bidirectional, BATCH, 6, 3),
    _layer("einsum", lambda r: nnx.Einsum("btd,dh->bth", (8, 6), (6,), rngs=r), BATCH, 5, 8),
    _layer("linear_general", lambda r: nnx.LinearGeneral((4, 6), (2, 3), axis=(-2, -1), rngs=r), BATCH, 4, 6),
    _layer("transformer_block", lambda r: TransformerBlock(8, 2, rngs=r), BATCH, 6, 8),
    _layer("resnet_block", lambda r: ResNetBlock(3, 8, rngs=r), BATCH, 6, 6, 3),
    _training("adamw_cnn", lambda r: CNN(rngs=r), 16, 4, 8, 8, 3),
    _training("adamw_pool_stem", lambda r: Stem(rngs=r), 8, 4, 8, 8, 3),
    _training("adamw_resnet_block", lambda r: ResNetBlock(3, 8, rngs=r), 8, 4, 6, 6, 3),
    # Softmax ignores what the key bias adds to every logit of a query: its gradient is 0.
    _training(
      "adamw_transformer_block",
      lambda r: TransformerBlock(8, 2, rngs=r),
      8,
      4,
      6,
      8,
      noise=("model.body.attention.key.bias",),
    ),
    _layer("mlp_float16", _mlp(jnp.float16), BATCH, 8, rtol=2e-3),
    _layer("mlp_bfloat16", _mlp(jnp.bfloat16), BATCH, 8, rtol=2e-2),
    CatalogEntry("int8_input", lambda: QuantizedInput(rngs=nnx.Rngs(0)), {"apply": forward()}, pixel_inputs),
  ]


class _Causal(nnx.Module):
  """Self-attention under a causal mask."""

  def __init__(self, attention: nnx.MultiHeadAttention):
    self.attention = attention

  def __call__(self, x):
    return self.attention(x, mask=nnx.make_causal_mask(jnp.ones(x.shape[:2])))


CATALOG: dict[str, CatalogEntry] = {entry.name: entry for entry in _entries()}
