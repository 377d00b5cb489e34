"""A GPT-2-shaped decoder with a key/value cache, and greedy or sampled generation that runs on the device.

The model is written as a Flax NNX user writes one: ``nnx.Embed``, ``nnx.Linear``,
``nnx.LayerNorm``, pre-LayerNorm blocks, a GELU MLP and the output projection tied to
the token embedding. ``GPTConfig.small()`` is GPT-2 small (124M parameters);
``GPTConfig.tiny()`` is the same code at a size the tests compile in seconds.

Generation has three entry points, each a method that changes the model's
``nnx.Cache`` variables (the keys and values of every layer, and the position):

- ``prefill(tokens, length)``: the prompt, right-padded to a fixed length (a *bucket*),
  whose first ``length`` tokens are real. Causal attention means a real token never
  sees the padding after it, and the padding's cache entries are masked out of every
  later step and overwritten as the sequence grows, so no extra mask is needed.
- ``decode_step(token)``: one token at the next position.
- ``generate(model, tokens, length, steps, temperature)``: prefill, then ``steps``
  sampling steps in an ``nnx.fori_loop``, so an exported program runs the whole loop
  in one call, with the sampling RNG (an ``nnx.Rngs`` on the model) advancing on the device.

``generation_functions`` builds the exports of one program (a prefill and a generate
per bucket, and the decode step), and ``generate_on`` runs a loaded program from Python.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from compile import NnxMetalError


def _init(config: "GPTConfig"):
  return nnx.initializers.normal(config.init_std)


class GenerationError(NnxMetalError, ValueError):
  """A prompt or a generation request that does not fit the model or the exported program."""


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """The shape of a GPT model.

  Attributes:
    vocab_size: tokens in the vocabulary.
    context: the longest sequence (learned positions and the cache's length).
    layers: transformer blocks.
    features: the width of the residual stream.
    heads: attention heads (``features`` must be a multiple).
    mlp_ratio: the MLP's hidden width over ``features``.
    init_std: the standard deviation of the random weights (GPT-2's ``initializer_range``;
      position embeddings get half of it, as GPT-2's did).
  """

  vocab_size: int = 50257
  context: int = 1024
  layers: int = 12
  features: int = 768
  heads: int = 12
  mlp_ratio: int = 4
  init_std: float = 0.02

  def __post_init__(self):
    if self.features % self.heads:
      raise GenerationError(f"GPTConfig: features ({self.features}) must be a multiple of heads ({self.heads}).")

  @classmethod
  def small(cls) -> "GPTConfig":
    """GPT-2 small: 12 layers, width 768, 12 heads, 50,257 tokens, context 1,024 (124M parameters)."""
    return cls()

  @classmethod
  def tiny(cls) -> "GPTConfig":
    """The same architecture at a size that compiles in seconds, for tests and docs.

    Its weights are larger than GPT-2's so that greedy decoding of random weights does not
    settle on repeating one token (the token's own embedding dominating the residual
    stream): parity tests then compare varied tokens.
    """
    return cls(vocab_size=97, context=32, layers=2, features=32, heads=4, init_std=0.5)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax attention: ``q`` (B, T, H, D) over ``k``/``v`` (B, S, H, D) where ``mask`` (T, S) is true."""
  scores = jnp.einsum("bthd,bshd->bhts", q, k) * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
  out = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)
  return out.reshape(*out.shape[:2], -1)


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention with one fused query/key/value projection and a key/value cache."""

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    self.heads = config.heads
    self.qkv = nnx.Linear(config.features, 3 * config.features, kernel_init=_init(config), rngs=rngs)
    self.out = nnx.Linear(config.features, config.features, kernel_init=_init(config), rngs=rngs)

  def init_cache(self, batch: int, context: int) -> None:
    """Creates the key/value cache (``nnx.Cache``) for ``batch`` sequences of up to ``context`` tokens."""
    features = self.out.in_features
    shape = (batch, context, self.heads, features // self.heads)
    self.cached_key = nnx.Cache(jnp.zeros(shape, jnp.float32))
    self.cached_value = nnx.Cache(jnp.zeros(shape, jnp.float32))

  def _heads(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
    return tuple(t.reshape(*t.shape[:2], self.heads, -1) for t in (q, k, v))

  def __call__(self, x: jax.Array) -> jax.Array:
    """Attention over ``x`` itself (B, T, F), causal; the cache is neither read nor written."""
    q, k, v = self._heads(x)
    length = x.shape[1]
    return self.out(_attend(q, k, v, jnp.tril(jnp.ones((length, length), bool))))

  def prefill(self, x: jax.Array) -> jax.Array:
    """Like ``__call__``, and writes the keys and values of positions ``0..T-1`` into the cache."""
    q, k, v = self._heads(x)
    self.cached_key[...] = jax.lax.dynamic_update_slice(self.cached_key[...], k, (0, 0, 0, 0))
    self.cached_value[...] = jax.lax.dynamic_update_slice(self.cached_value[...], v, (0, 0, 0, 0))
    length = x.shape[1]
    return self.out(_attend(q, k, v, jnp.tril(jnp.ones((length, length), bool))))

  def decode(self, x: jax.Array, position: jax.Array) -> jax.Array:
    """One token ``x`` (B, 1, F) at ``position``: written into the cache, attending to positions ``<= position``."""
    q, k, v = self._heads(x)
    zero = jnp.zeros((), jnp.int32)
    start = (zero, position, zero, zero)
    keys = self.cached_key[...] = jax.lax.dynamic_update_slice(self.cached_key[...], k, start)
    values = self.cached_value[...] = jax.lax.dynamic_update_slice(self.cached_value[...], v, start)
    mask = (jnp.arange(keys.shape[1]) <= position)[None, :]
    return self.out(_attend(q, keys, values, mask))


class MLP(nnx.Module):
  """``features -> mlp_ratio * features -> features`` with GELU (tanh approximation, as GPT-2)."""

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    hidden = config.mlp_ratio * config.features
    self.up = nnx.Linear(config.features, hidden, kernel_init=_init(config), rngs=rngs)
    self.down = nnx.Linear(hidden, config.features, kernel_init=_init(config), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(nnx.gelu(self.up(x), approximate=True))


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(config.features, epsilon=1e-5, rngs=rngs)
    self.attention = CausalSelfAttention(config, rngs=rngs)
    self.norm2 = nnx.LayerNorm(config.features, epsilon=1e-5, rngs=rngs)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x: jax.Array, *, mode: str = "full", position: jax.Array | None = None) -> jax.Array:
    normed = self.norm1(x)
    if mode == "full":
      x = x + self.attention(normed)
    elif mode == "prefill":
      x = x + self.attention.prefill(normed)
    else:
      x = x + self.attention.decode(normed, position)
    return x + self.mlp(self.norm2(x))


class GPT(nnx.Module):
  """A GPT-2-shaped decoder: token and learned position embeddings, pre-LayerNorm blocks, tied output.

  Example:
    >>> model = GPT(GPTConfig.tiny(), rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((1, 5), jnp.int32)).shape
    (1, 5, 97)
  """

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs, sample_seed: int = 0):
    self.config = config
    init = nnx.initializers.normal
    self.embed = nnx.Embed(config.vocab_size, config.features, embedding_init=init(config.init_std), rngs=rngs)
    self.positions = nnx.Embed(config.context, config.features, embedding_init=init(config.init_std / 2), rngs=rngs)
    self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.layers)])
    self.norm = nnx.LayerNorm(config.features, epsilon=1e-5, rngs=rngs)
    # The sampling stream: its key and count are state, so they advance on the device too.
    self.sampling = nnx.Rngs(sample=sample_seed)

  def _logits(self, x: jax.Array) -> jax.Array:
    return self.embed.attend(self.norm(x))  # the output projection is the token embedding, transposed

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Logits (B, T, vocab) for every position of ``tokens`` (B, T); no cache needed."""
    x = self.embed(tokens) + self.positions(jnp.arange(tokens.shape[1]))
    for block in self.blocks:
      x = block(x)
    return self._logits(x)

  def init_cache(self, batch: int = 1) -> None:
    """Creates the key/value cache of every layer for ``batch`` sequences, and the position counter."""
    for block in self.blocks:
      block.attention.init_cache(batch, self.config.context)
    self.position = nnx.Cache(jnp.zeros((), jnp.int32))

  def prefill(self, tokens: jax.Array, length: jax.Array) -> jax.Array:
    """Starts a sequence: ``tokens`` (B, T) right-padded, the first ``length`` real; logits (B, vocab) of the last."""
    x = self.embed(tokens) + self.positions(jnp.arange(tokens.shape[1]))
    for block in self.blocks:
      x = block(x, mode="prefill")
    self.position[...] = jnp.asarray(length, jnp.int32)
    last = jax.lax.dynamic_slice_in_dim(x, self.position[...] - 1, 1, axis=1)
    return self._logits(last)[:, 0]

  def decode_step(self, token: jax.Array) -> jax.Array:
    """Appends ``token`` (B,) at the next position; returns the logits (B, vocab) of the token after it."""
    position = self.position[...]
    x = self.embed(token[:, None]) + self.positions(position[None])
    for block in self.blocks:
      x = block(x, mode="decode", position=position)
    self.position[...] = position + 1
    return self._logits(x)[:, 0]

  def sampling_noise(self, steps: int, batch: int) -> jax.Array:
    """Gumbel noise (steps, batch, vocab) for ``steps`` sampling steps, from one key of the model's sampling stream."""
    return jax.random.gumbel(self.sampling.sample(), (steps, batch, self.config.vocab_size))


def _kth_largest(logits: jax.Array, k: int) -> jax.Array:
  """The ``k``-th largest logit of each row (B, 1), by ``k`` max reductions (tied values count once).

  Not ``jax.lax.top_k``: it lowers to a sort whose SPIR-V kernel races (IREE 3.13; the race
  check refuses the Metal build), while max reductions compile correctly everywhere.
  """
  lowest = jnp.finfo(logits.dtype).min
  for _ in range(k - 1):
    logits = jnp.where(logits >= logits.max(axis=-1, keepdims=True), lowest, logits)
  return logits.max(axis=-1, keepdims=True)


def sample(logits: jax.Array, temperature: jax.Array, noise: jax.Array, top_k: int | None = None) -> jax.Array:
  """The next token (B,): the argmax where ``temperature`` is 0, else drawn from the ``top_k`` most likely.

  Drawing is Gumbel-max, ``argmax(logits / temperature + noise)`` with Gumbel ``noise``,
  which is exactly sampling from ``softmax(logits / temperature)`` (it is how
  ``jax.random.categorical`` samples).
  """
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if top_k is not None:
    logits = jnp.where(logits < _kth_largest(logits, top_k), jnp.finfo(logits.dtype).min, logits)
  scaled = logits / jnp.maximum(temperature, jnp.asarray(1e-6, logits.dtype)) + noise
  return jnp.where(temperature > 0, jnp.argmax(scaled, axis=-1).astype(jnp.int32), greedy)


def generate(
  model: GPT,
  tokens: jax.Array,
  length: jax.Array,
  steps: jax.Array,
  temperature: jax.Array,
  *,
  max_new: int,
  top_k: int | None = None,
) -> jax.Array:
  """Prefills ``tokens`` (B, T; the first ``length`` real) and samples ``steps <= max_new`` tokens after them.

  Returns (B, max_new) int32: the new tokens, zeros after the first ``steps``. The loop
  is an ``nnx.fori_loop`` over the model, so exported it runs on the device in one call.
  The sampling noise of all ``max_new`` steps is drawn before the loop, from one key of
  the model's stream (which so advances once per call, on the device): IREE 3.13 crashes
  compiling a PRNG draw inside the loop (JAX's threefry is itself a loop; iree-compile
  segfaults in Stream's ResourceUsage analysis).
  """
  logits = model.prefill(tokens, length)
  generated = jnp.zeros((tokens.shape[0], max_new), jnp.int32)
  noise = model.sampling_noise(max_new, tokens.shape[0])

  def step(i, carry):
    model, logits, generated = carry
    token = sample(logits, temperature, noise[i], top_k)
    generated = jax.lax.dynamic_update_slice(generated, token[:, None], (jnp.zeros((), jnp.int32), i))
    return model, model.decode_step(token), generated

  start, stop = jnp.zeros((), jnp.int32), jnp.minimum(steps, max_new)
  _, _, generated = nnx.fori_loop(start, stop, step, (model, logits, generated))
  return generated


def _prefill(model: GPT, tokens: jax.Array, length: jax.Array) -> jax.Array:
  return model.prefill(tokens, length)


def _decode_step(model: GPT, token: jax.Array) -> jax.Array:
  return model.decode_step(token)


def _generate_with(max_new: int, top_k: int | None):
  def generate_fn(model, tokens, length, steps, temperature):
    return generate(model, tokens, length, steps, temperature, max_new=max_new, top_k=top_k)

  return generate_fn


def generation_functions(
  model: GPT, *, buckets: Sequence[int], max_new: int, batch: int = 1, top_k: int | None = None, generate: bool = True
) -> dict[str, Any]:
  """The exports of a generation program: ``prefill_<T>`` and ``generate_<T>`` per bucket ``T``, and ``decode_step``.

  Pass the result to ``compile.export(model, ...)``; ``model`` must have its cache
  (``model.init_cache(batch)``). A prompt runs in the smallest bucket that holds it.
  """
  import compile as nnxc

  if not hasattr(model, "position"):
    raise GenerationError("generation_functions(model): call model.init_cache(batch) first; the cache is exported.")
  for bucket in buckets:
    if not 0 < bucket <= model.config.context:
      raise GenerationError(f"generation_functions: bucket {bucket} is outside 1..context ({model.config.context}).")
  functions = {}
  scalar = jnp.zeros((), jnp.int32)
  for bucket in sorted(buckets):
    tokens = jnp.zeros((batch, bucket), jnp.int32)
    functions[f"prefill_{bucket}"] = nnxc.function(_prefill, tokens, scalar)
    if generate:
      temperature = jnp.zeros((), jnp.float32)
      functions[f"generate_{bucket}"] = nnxc.function(
        _generate_with(max_new, top_k), tokens, scalar, scalar, temperature
      )
  functions["decode_step"] = nnxc.function(_decode_step, jnp.zeros((batch,), jnp.int32))
  return functions


def _buckets(program: Any, prefix: str) -> list[int]:
  return sorted(int(name[len(prefix) :]) for name in program.functions if name.startswith(prefix))


def pad_prompt(prompt: Any, buckets: Sequence[int]) -> tuple[np.ndarray, np.int32]:
  """``prompt`` (B, n) right-padded with zeros to the smallest bucket that holds it, and ``n`` as int32."""
  prompt = np.asarray(prompt, np.int32)
  if prompt.ndim == 1:
    prompt = prompt[None]
  length = prompt.shape[1]
  fitting = [b for b in sorted(buckets) if b >= length]
  if length == 0 or not fitting:
    raise GenerationError(
      f"prompt of {length} tokens: it must hold 1 to {max(buckets)} tokens (the buckets are {sorted(buckets)}); "
      "export a larger bucket with generation_functions(..., buckets=...)."
    )
  padded = np.zeros((prompt.shape[0], fitting[0]), np.int32)
  padded[:, :length] = prompt
  return padded, np.int32(length)


def generate_on(program: Any, prompt: Any, steps: int, *, temperature: float = 0.0) -> np.ndarray:
  """Runs ``generate_<T>`` of a loaded program on ``prompt`` (B, n) for ``steps`` new tokens; returns (B, steps)."""
  padded, length = pad_prompt(prompt, _buckets(program, "generate_"))
  fn = program.functions[f"generate_{padded.shape[1]}"]
  max_new = fn.spec.outputs[0].shape[-1]
  if not 0 < steps <= max_new:
    raise GenerationError(f"generate_on: steps={steps}, this program generates 1 to {max_new} tokens per call.")
  generated = fn(padded, length, np.int32(steps), np.float32(temperature))
  return np.asarray(generated)[:, :steps]


def decode_loop(program: Any, prompt: Any, steps: int) -> np.ndarray:
  """Greedy generation from Python: ``prefill_<T>`` once, then ``decode_step`` per token; returns (B, steps)."""
  padded, length = pad_prompt(prompt, _buckets(program, "prefill_"))
  logits = program.functions[f"prefill_{padded.shape[1]}"](padded, length)
  tokens = []
  for _ in range(steps):
    token = np.argmax(logits, axis=-1).astype(np.int32)
    tokens.append(token)
    logits = program.decode_step(token)
  return np.stack(tokens, axis=1)
