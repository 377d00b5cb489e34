"""The GPT model: its cache against its own full forward pass, and generation from a program against eager NNX.

One program per target holds prefill and generate for two prompt buckets and the decode
step, with the key/value cache and the sampling RNG resident; every test compares it with
the same functions run eagerly on a fresh model from the same seed, token for token.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import compile as nnxc
from nnx_models import GPT, GenerationError, GPTConfig, decode_loop, generate, generate_on, generation_functions
from tests.conftest import TOLERANCES, assert_trees_allclose, require_device

BUCKETS = (4, 8)
MAX_NEW = 8
TOP_K = 5  # sampling from the 5 most likely: the k-th largest by max reductions, race-free on Metal
PROMPTS = [np.array([[5, 7, 11]], np.int32), np.array([[3, 1, 4, 1, 5, 9]], np.int32)]  # one per bucket


def fresh_model() -> GPT:
  model = GPT(GPTConfig.tiny(), rngs=nnx.Rngs(0), sample_seed=7)
  model.init_cache(batch=1)
  return model


@pytest.fixture(scope="module", params=["cpu", "metal-vulkan"])
def loaded(request):
  """(target, program): the generation program of the tiny model, compiled and loaded once per target.

  Loaded once, as lavapipe builds each kernel's pipeline on its first call (seconds);
  each test starts by pushing a fresh model's whole state.
  """
  require_device(request.param)
  model = fresh_model()
  functions = generation_functions(model, buckets=BUCKETS, max_new=MAX_NEW, top_k=TOP_K)
  return request.param, nnxc.export(model, functions, target=request.param).load()


@pytest.fixture
def exported(loaded):
  """(target, program) holding the state of :func:`fresh_model`."""
  target, program = loaded
  program.load_state(fresh_model())
  return target, program


def eager_decode_loop(model: GPT, prompt: np.ndarray, steps: int) -> tuple[np.ndarray, list[np.ndarray]]:
  """What ``decode_loop`` does on a program, on the eager model: greedy tokens and the logits of each step."""
  bucket = min(b for b in BUCKETS if b >= prompt.shape[1])
  padded = np.zeros((1, bucket), np.int32)
  padded[:, : prompt.shape[1]] = prompt
  logits = model.prefill(jnp.asarray(padded), jnp.int32(prompt.shape[1]))
  tokens, all_logits = [], [np.asarray(logits)]
  for _ in range(steps):
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    tokens.append(np.asarray(token))
    logits = model.decode_step(token)
    all_logits.append(np.asarray(logits))
  return np.stack(tokens, axis=1), all_logits


def test_prefill_and_decode_match_the_full_forward_pass():
  model = fresh_model()
  prompt = jnp.asarray(PROMPTS[1])
  padded = jnp.zeros((1, 8), jnp.int32).at[:, :6].set(prompt)
  prefill_logits = model.prefill(padded, jnp.int32(6))  # padding after the prompt changes nothing
  np.testing.assert_allclose(prefill_logits, model(prompt)[:, -1], rtol=1e-5, atol=1e-5)
  sequence = prompt
  for token in (17, 42, 0):
    step_logits = model.decode_step(jnp.array([token], jnp.int32))
    sequence = jnp.concatenate([sequence, jnp.array([[token]], jnp.int32)], axis=1)
    np.testing.assert_allclose(step_logits, model(sequence)[:, -1], rtol=1e-5, atol=1e-5)
  assert int(model.position[...]) == sequence.shape[1]


def test_decode_step_loop_matches_eager_token_for_token(exported):
  target, program = exported
  expected_tokens, _ = eager_decode_loop(fresh_model(), PROMPTS[0], MAX_NEW)
  np.testing.assert_array_equal(decode_loop(program, PROMPTS[0], MAX_NEW), expected_tokens)
  # The other bucket step by step: the logits of every step, and the cache the program holds after it.
  model = fresh_model()
  expected_tokens, expected_logits = eager_decode_loop(model, PROMPTS[1], MAX_NEW)
  padded = np.zeros((1, BUCKETS[1]), np.int32)
  padded[:, : PROMPTS[1].shape[1]] = PROMPTS[1]
  actual_logits = [program.functions[f"prefill_{BUCKETS[1]}"](padded, np.int32(PROMPTS[1].shape[1]))]
  for token in expected_tokens[0]:
    actual_logits.append(program.decode_step(np.array([token], np.int32)))
  assert_trees_allclose(actual_logits, expected_logits, **TOLERANCES[target])
  assert_trees_allclose(program.state(nnx.Cache), nnx.state(model, nnx.Cache), **TOLERANCES[target])


def test_generate_on_the_device_matches_eager_token_for_token(exported):
  (_, program), model = exported, fresh_model()
  # Greedy, then sampled twice from the same prompt: the sampling RNG advances on the device in between.
  for prompt, temperature in [(PROMPTS[1], 0.0), (PROMPTS[0], 0.8), (PROMPTS[0], 0.8)]:
    bucket = min(b for b in BUCKETS if b >= prompt.shape[1])
    padded = jnp.zeros((1, bucket), jnp.int32).at[:, : prompt.shape[1]].set(prompt)
    length, steps = jnp.int32(prompt.shape[1]), MAX_NEW - 2
    expected = generate(model, padded, length, jnp.int32(steps), jnp.float32(temperature), max_new=MAX_NEW, top_k=TOP_K)
    np.testing.assert_array_equal(generate_on(program, prompt, steps, temperature=temperature), expected[:, :steps])
  np.testing.assert_array_equal(expected[:, steps:], 0)  # past `steps` the output stays empty
  assert_trees_allclose(program.state(nnx.RngState), nnx.state(model, nnx.RngState), rtol=0, atol=0)
  assert int(program.state(nnx.Cache)["position"][...]) == prompt.shape[1] + steps


def test_sampling_at_a_temperature_draws_other_tokens_than_greedy():
  # Guards the test above: with these weights, sampling is not the argmax in disguise.
  greedy, sampled = fresh_model(), fresh_model()
  prompt, length, steps = jnp.zeros((1, 8), jnp.int32).at[:, :6].set(PROMPTS[1]), jnp.int32(6), jnp.int32(MAX_NEW)
  tokens = [generate(m, prompt, length, steps, jnp.float32(t), max_new=MAX_NEW) for m, t in ((greedy, 0), (sampled, 1))]
  assert not np.array_equal(*tokens)
  assert len(np.unique(tokens[0])) > 3  # greedy decoding of the tiny model does not repeat one token


def test_top_k_sampling_draws_only_among_the_k_most_likely():
  from nnx_models._gpt import sample

  logits = jax.random.normal(jax.random.key(0), (64, 97))
  noise = jax.random.gumbel(jax.random.key(1), (64, 97))
  tokens = sample(logits, jnp.float32(5.0), noise, top_k=TOP_K)  # hot: unrestricted sampling would stray
  allowed = jnp.argsort(logits, axis=-1)[:, -TOP_K:]
  assert bool(jnp.all(jnp.any(allowed == tokens[:, None], axis=-1)))
  assert len(np.unique(np.asarray(tokens) - np.asarray(jnp.argmax(logits, -1)))) > 1  # not always the argmax


def test_generation_requests_that_do_not_fit_are_refused(exported):
  _, program = exported
  with pytest.raises(GenerationError, match="prompt of 9 tokens.*buckets are \\[4, 8\\]"):
    generate_on(program, np.ones((1, 9), np.int32), 3)
  with pytest.raises(GenerationError, match="steps=9"):
    generate_on(program, PROMPTS[0], MAX_NEW + 1)
  with pytest.raises(GenerationError, match="init_cache"):
    generation_functions(GPT(GPTConfig.tiny(), rngs=nnx.Rngs(0)), buckets=BUCKETS, max_new=4)
  with pytest.raises(GenerationError, match="features \\(30\\) must be a multiple of heads \\(4\\)"):
    GPTConfig(features=30, heads=4)


def test_gpt2_small_has_124m_parameters():
  model = nnx.eval_shape(lambda: GPT(GPTConfig.small(), rngs=nnx.Rngs(0)))
  count = sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert 124e6 < count < 125e6  # GPT-2 small's 124,439,808: the tied output adds none
