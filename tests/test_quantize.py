"""int8 quantization surgery: what it replaces, how close it stays to float32, and its program against eager NNX."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import compile as nnxc
from nnx_models import (
  GPT,
  GPTConfig,
  QuantizationError,
  QuantizedEmbed,
  QuantizedLinear,
  QuantizedParam,
  decode_loop,
  dequantize,
  generation_functions,
  quantize,
)
from tests.conftest import TOLERANCES, assert_trees_allclose, require_device

PROMPT = np.array([[5, 7, 11, 3, 2]], np.int32)
STEPS = 6


def float_model(seed: int = 0) -> GPT:
  model = GPT(GPTConfig.tiny(), rngs=nnx.Rngs(seed))
  model.init_cache(batch=1)
  return model


def test_quantize_replaces_linears_and_embeddings_and_keeps_the_rest():
  model = float_model()
  quantized = quantize(model)
  up = quantized.blocks[0].mlp.up
  assert isinstance(up, QuantizedLinear) and isinstance(quantized.embed, QuantizedEmbed)
  assert up.kernel.dtype == jnp.int8 and up.scale.shape == (up.kernel.shape[1],)
  assert up.bias is model.blocks[0].mlp.up.bias  # shared, like lora's base weights
  assert isinstance(model.blocks[0].mlp.up, nnx.Linear)  # the original is untouched
  np.testing.assert_allclose(up.dequantized(), model.blocks[0].mlp.up.kernel[...], atol=float(up.scale[...].max()))
  # Filters see the new Variable type: 2 Linears per attention and MLP per block, and 2 embeddings.
  leaves = jax.tree.leaves(nnx.state(quantized, QuantizedParam))
  assert len(leaves) == 2 * (4 * model.config.layers + 2)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(quantized, nnx.Param)))
  only_linears = quantize(model, embeddings=False, where=nnx.PathContains("mlp"))
  assert isinstance(only_linears.embed, nnx.Embed) and isinstance(only_linears.blocks[0].attention.qkv, nnx.Linear)


def test_int8_logits_stay_close_to_float32():
  model = float_model()
  tokens = jax.random.randint(jax.random.key(1), (4, 24), 0, model.config.vocab_size)
  quantized = quantize(model)
  expected, actual = model(tokens), quantized(tokens)
  # The products dequantize exactly: the same as float32 layers holding the dequantized weights.
  np.testing.assert_allclose(actual, dequantize(quantized)(tokens), rtol=1e-5, atol=1e-4)
  # And int8 rounding moves the logits little (the tiny model's weights are 25x GPT-2's, its
  # activations far from GPT-2's scale, so this bounds gross errors; bench_llm measures GPT-2 small).
  relative_error = float(jnp.max(jnp.abs(actual - expected)) / jnp.max(jnp.abs(expected)))
  top1_agreement = float(jnp.mean(jnp.argmax(actual, -1) == jnp.argmax(expected, -1)))
  assert relative_error < 0.15, relative_error
  assert top1_agreement >= 0.9, top1_agreement


def test_bits_other_than_8_are_refused():
  with pytest.raises(QuantizationError, match="bits=4.*only bits=8"):
    quantize(float_model(), bits=4)


@pytest.mark.parametrize("target", ["cpu", "metal-vulkan"])
def test_quantized_program_matches_eager_and_swaps_weights(target):
  require_device(target)
  functions = generation_functions(quantize(float_model()), buckets=(8,), max_new=STEPS, generate=False)
  artifact = nnxc.export(quantize(float_model()), functions, target=target)
  program = artifact.load()
  assert {v.variable_type for v in artifact.state if v.dtype == "int8"} == {"QuantizedParam"}

  def eager_loop(model):  # decode_loop's greedy steps, on the eager model
    padded = jnp.zeros((1, 8), jnp.int32).at[:, :5].set(PROMPT)
    logits, tokens = model.prefill(padded, jnp.int32(5)), []
    for _ in range(STEPS):
      tokens.append(jnp.argmax(logits, -1).astype(jnp.int32))
      logits = model.decode_step(tokens[-1])
    return np.stack(tokens, axis=1), logits

  model = quantize(float_model())
  expected_tokens, expected_logits = eager_loop(model)
  np.testing.assert_array_equal(decode_loop(program, PROMPT, STEPS), expected_tokens)
  assert_trees_allclose(program.state(nnx.Cache), nnx.state(model, nnx.Cache), **TOLERANCES[target])

  # Another model's int8 weights, swapped in without recompiling (biases and norms stay).
  other = quantize(float_model(seed=1))
  program.load_state(other, QuantizedParam)
  hybrid = quantize(float_model())
  nnx.update(hybrid, nnx.state(other, QuantizedParam))
  expected_tokens, _ = eager_loop(hybrid)
  np.testing.assert_array_equal(decode_loop(program, PROMPT, STEPS), expected_tokens)


def test_quantized_metal_build_passes_the_race_check():
  model = quantize(float_model())
  functions = generation_functions(model, buckets=(8,), max_new=STEPS)
  artifact = nnxc.export(model, functions, target="metal")
  assert artifact.manifest.hazard_check == "passed"
  assert all(f.dispatch_count > 0 for f in artifact.functions.values())
