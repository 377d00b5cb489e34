"""int8 weight quantization as model surgery: Linears and Embeds swapped for int8 weights with per-channel scales.

In the spirit of :func:`nnx_models.lora`: ``quantize(model)`` walks the object graph and
replaces each ``nnx.Linear`` with a :class:`QuantizedLinear` (and each ``nnx.Embed`` with a
:class:`QuantizedEmbed`), whose weights are :class:`QuantizedParam` variables: the int8
values and one float32 scale per output channel. Filters select them
(``nnx.state(model, QuantizedParam)``) and ``program.load_state(model, QuantizedParam)``
swaps them into an exported program without recompiling.

The products dequantize inside the kernel: ``(x @ int8_kernel) * scale``, where the
int8-to-float conversion is an elementwise producer that IREE fuses into the matrix
product's dispatch (``vecmat_..._f32xi8xf32``), so a Linear's float32 weights never exist
in memory. A tied output projection (``QuantizedEmbed.attend``) is the exception on IREE
3.13: it converts and transposes the table in a dispatch of its own on every call.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import filterlib

from compile import NnxMetalError

_QUANTIZABLE = (nnx.Linear, nnx.Embed)


class QuantizationError(NnxMetalError, ValueError):
  """A quantization request nnx-metal does not support."""


class QuantizedParam(nnx.Variable):
  """A quantized weight (int8 values) or its per-channel float32 scales.

  Not an ``nnx.Param``: optimizers and ``nnx.state(model, nnx.Param)`` leave the quantized
  weights alone, and ``nnx.state(model, QuantizedParam)`` selects exactly them.
  """


def _quantize_int8(weight: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """Symmetric int8 quantization with one scale per index of ``axis``: ``weight ~= values * scale``."""
  reduce = tuple(a for a in range(weight.ndim) if a != axis % weight.ndim)
  largest = jnp.max(jnp.abs(weight), axis=reduce)
  scale = jnp.where(largest > 0, largest / 127.0, 1.0).astype(jnp.float32)
  values = jnp.clip(jnp.round(weight / jnp.expand_dims(scale, reduce)), -127, 127).astype(jnp.int8)
  return values, scale


class QuantizedLinear(nnx.Module):
  """``x @ (kernel * scale) + bias`` with an int8 ``kernel`` (in, out) and a float32 ``scale`` per output."""

  def __init__(self, linear: nnx.Linear):
    values, scale = _quantize_int8(linear.kernel[...], axis=-1)
    self.kernel = QuantizedParam(values)
    self.scale = QuantizedParam(scale)
    self.bias = linear.bias  # kept in float32, shared with the original Linear

  def __call__(self, x: jax.Array) -> jax.Array:
    # Scaling the product's columns equals scaling the kernel's: the float kernel is never built.
    y = jnp.dot(x, self.kernel[...].astype(x.dtype)) * self.scale[...].astype(x.dtype)
    return y if self.bias is None else y + self.bias[...].astype(x.dtype)

  def dequantized(self) -> jax.Array:
    """The float32 kernel this layer computes with."""
    return self.kernel[...].astype(jnp.float32) * self.scale[...]

  def to_float(self) -> nnx.Linear:
    """An ``nnx.Linear`` with the dequantized kernel (the bias is shared)."""
    din, dout = self.kernel.shape
    linear = nnx.Linear(din, dout, use_bias=self.bias is not None, rngs=nnx.Rngs(0))
    linear.kernel[...] = self.dequantized()
    if self.bias is not None:
      linear.bias = self.bias
    return linear


class QuantizedEmbed(nnx.Module):
  """An embedding table of int8 rows with one float32 scale per row, for lookups and ``attend``."""

  def __init__(self, embed: nnx.Embed):
    values, scale = _quantize_int8(embed.embedding[...], axis=0)
    self.embedding = QuantizedParam(values)
    self.scale = QuantizedParam(scale)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return self.embedding[...][ids].astype(jnp.float32) * self.scale[...][ids][..., None]

  def attend(self, query: jax.Array) -> jax.Array:
    """``query @ table.T``, as ``nnx.Embed.attend`` (a tied output projection), scaled per row of the table."""
    return jnp.dot(query, self.embedding[...].astype(query.dtype).T) * self.scale[...].astype(query.dtype)

  def to_float(self) -> nnx.Embed:
    """An ``nnx.Embed`` with the dequantized table."""
    embed = nnx.Embed(*self.embedding.shape, rngs=nnx.Rngs(0))
    embed.embedding[...] = self.embedding[...].astype(jnp.float32) * self.scale[...][:, None]
    return embed


def quantize(
  model: nnx.Module, bits: int = 8, *, where: filterlib.Filter = _QUANTIZABLE, embeddings: bool = True
) -> nnx.Module:
  """Returns ``model`` with its Linears (and Embeds) replaced by int8 :class:`QuantizedLinear`/:class:`QuantizedEmbed`.

  The walk covers attributes, ``nnx.List``/``nnx.Dict`` containers and nested modules,
  as :func:`nnx_models.lora`'s. A layer reached from several parents becomes one
  quantized layer shared by all of them. Biases, norms and every other variable are kept
  (shared with ``model``, which is not modified).

  Args:
    model: the module to quantize.
    bits: 8 (int8 with symmetric per-channel scales) is the only width supported.
    where: an NNX filter on ``(path, node)``, e.g. ``nnx.PathContains("blocks")``; only
      Linears and Embeds that also match it are quantized.
    embeddings: whether ``nnx.Embed`` tables are quantized too (per row, which serves
      both lookups and a tied output projection).

  Example:
    >>> from nnx_models import GPT, GPTConfig
    >>> model = quantize(GPT(GPTConfig.tiny(), rngs=nnx.Rngs(0)))
    >>> type(model.blocks[0].mlp.up).__name__, model.blocks[0].mlp.up.kernel.dtype
    ('QuantizedLinear', dtype('int8'))
  """
  if bits != 8:
    raise QuantizationError(
      f"quantize(bits={bits!r}): only bits=8 is supported (int8 weights, float32 per-channel scales); "
      "int4 is not implemented."
    )
  kinds = _QUANTIZABLE if embeddings else (nnx.Linear,)
  matches = filterlib.to_predicate(nnx.All(kinds, where))

  def replace(path, node):
    if not matches(path, node):
      return node
    return QuantizedEmbed(node) if isinstance(node, nnx.Embed) else QuantizedLinear(node)

  return nnx.recursive_map(replace, model)


def dequantize(model: nnx.Module) -> nnx.Module:
  """Returns ``model`` with each quantized layer back as a float32 ``nnx.Linear``/``nnx.Embed`` (dequantized weights).

  The float model computes what the quantized one does, up to float rounding: the
  reference that isolates the kernels' dequantization from the quantization error.
  """

  def unquantize(path, node):
    return node.to_float() if isinstance(node, QuantizedLinear | QuantizedEmbed) else node

  return nnx.recursive_map(unquantize, model)
