"""The ``--llm`` tier of ``nox -s bench``: GPT-2 small exported, generating on the device, against jax.jit.

``run(out_dir)`` measures, for ``GPTConfig.small()`` (``quick=True``: the tiny config):

- export: each build in its own process (so its peak RSS is its own): the float32 cpu
  program cold (an empty compile cache) and cached, the int8 program, and the Metal
  builds (race check verdict, dispatches per function); then ``Artifact.open`` and
  ``load()`` of the float32 artifact, with their time and peak RSS, against the bytes
  of the parameters; the size of ``params.irpa`` in float32 and int8.
- speed, in this process, interleaved: ``prefill_128`` (a 128-token prompt), decode
  tokens/s over 128 new tokens as a Python loop over ``decode_step`` (greedy, argmax on
  the host; on a program exported without ``generate``, whose module has no loop, see
  ``_speed``) and inside ``generate_128`` (one call; its decode rate is the 128 tokens over
  the generate time less the prefill time), for the float32 and the int8 programs, each
  against ``jax.jit`` of the same functions with the model's state (cache included) as
  the jitted function's state, donated and returned, as a JAX user runs it.
- int8 parity: the float32 program's 128 greedy tokens, teacher-forced through the float32
  and the int8 models (max logit error, top-1 agreement), and the int8 program's own
  greedy tokens against the float32 program's.

A benchmark, not a test: nothing here asserts. ``markdown(results)`` renders the tables.
"""

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import compile as nnxc
from nnx_models import GPT, GPTConfig, decode_loop, generate, generation_functions, pad_prompt, quantize

from .timing import interleaved

NEW_TOKENS = 128
PROMPT = 128


def _settings(quick: bool) -> dict[str, Any]:
  if quick:
    return {"config": "tiny", "buckets": (8, 16), "prompt": 16, "new": 8, "rounds": 2}
  return {"config": "small", "buckets": (32, PROMPT), "prompt": PROMPT, "new": NEW_TOKENS, "rounds": 3}


def _model(config: str, dtype: str) -> GPT:
  model = GPT(GPTConfig.small() if config == "small" else GPTConfig.tiny(), rngs=nnx.Rngs(0))
  model.init_cache(batch=1)
  return quantize(model) if dtype == "int8" else model


def _peak_rss_mb() -> dict[str, float]:
  """Peak resident memory (MB) of this process and of its finished children (iree-compile)."""
  own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
  return {"self": own, "children": children}


def _param_bytes(model: GPT) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))


def _export_phase(options: argparse.Namespace) -> dict[str, Any]:
  """One build, in this (fresh) process: build the model, export it, save it; times and peak RSS."""
  settings = _settings(options.config == "tiny")
  start = time.perf_counter()
  model = _model(options.config, options.dtype)
  build_seconds = time.perf_counter() - start
  rss_model = _peak_rss_mb()["self"]
  functions = generation_functions(model, buckets=settings["buckets"], max_new=settings["new"])
  start = time.perf_counter()
  artifact = nnxc.export(model, functions, target=options.target, cache=options.cache)
  export_seconds = time.perf_counter() - start
  result = {
    "model build s": build_seconds,
    "export s": export_seconds,
    "compile s": artifact.manifest.compile_seconds,
    "peak rss MB": _peak_rss_mb(),
    "rss after model MB": rss_model,
    "state bytes": _param_bytes(model),
    "hazard check": artifact.manifest.hazard_check,
    "dispatches": {name: f.dispatch_count for name, f in artifact.functions.items()},
    "kernels": len(artifact.manifest.dispatches),
  }
  if options.save:
    saved = artifact.save(options.save, overwrite=True)
    result["params.irpa bytes"] = (pathlib.Path(options.save) / "params.irpa").stat().st_size
    result["module.vmfb bytes"] = len(saved.vmfb)
  return result


def _load_phase(options: argparse.Namespace) -> dict[str, Any]:
  """``Artifact.open`` and ``load()`` of a saved artifact, in this (fresh) process; times and peak RSS."""
  before = _peak_rss_mb()["self"]
  start = time.perf_counter()
  artifact = nnxc.runtime.Artifact.open(options.artifact)
  open_seconds = time.perf_counter() - start
  after_open = _peak_rss_mb()["self"]
  start = time.perf_counter()
  program = artifact.load()
  load_seconds = time.perf_counter() - start
  after_load = _peak_rss_mb()["self"]
  state_bytes = sum(np.asarray(a).nbytes for a in artifact.params.values())
  del program
  return {
    "rss before MB": before,
    "open s": open_seconds,
    "peak rss after open MB": after_open,
    "load s": load_seconds,
    "peak rss after load MB": after_load,
    "state bytes": state_bytes,
  }


def _phase(*args: str) -> dict[str, Any]:
  """Runs one phase of this module in a fresh Python and returns its JSON result."""
  command = [sys.executable, "-m", "nnx_models.tools.bench_llm", *args]
  done = subprocess.run(command, capture_output=True, text=True, check=False)
  if done.returncode:
    raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def _jitted(model: GPT, settings: dict[str, Any]) -> dict[str, Any]:
  """``prefill``, ``decode_step`` and ``generate`` under ``jax.jit`` with the model's state as donated jit state."""
  graphdef, state = nnx.split(model)
  cell = [jax.tree.map(jnp.copy, state)]  # a copy: donation deletes the buffers it is given

  def stateful(fn):
    @partial(jax.jit, donate_argnums=0)
    def pure(state, *args):
      merged = nnx.merge(graphdef, state)
      return fn(merged, *args), nnx.state(merged)

    def call(*args):
      out, cell[0] = pure(cell[0], *args)
      return np.asarray(out)

    return call

  generate_fn = partial(generate, max_new=settings["new"])
  return {
    "prefill": stateful(lambda m, tokens, length: m.prefill(tokens, length)),
    "decode_step": stateful(lambda m, token: m.decode_step(token)),
    "generate": stateful(generate_fn),
  }


def _python_loop(prefill, decode_step, padded, length, steps: int) -> float:
  """Seconds for ``steps`` greedy decode steps after a prefill (not timed), argmax on the host."""
  logits = prefill(padded, length)
  start = time.perf_counter()
  for _ in range(steps):
    logits = decode_step(np.argmax(logits, axis=-1).astype(np.int32))
  return time.perf_counter() - start


def _speed(
  programs: dict[str, Any], serving: dict[str, Any], jits: dict[str, Any], settings: dict[str, Any], padded, length
) -> dict:
  """Median seconds of prefill, the Python decode loop and generate; program and jax.jit interleaved.

  The Python loop runs on ``serving``: programs of the same model without ``generate``, whose
  module has no loop, so IREE prepares the constant weights once at load (a module with a
  loop cannot, iree-org/iree#24753: see compile/_iree.py); ``generate`` runs on ``programs``.
  """
  bucket, new, rounds = padded.shape[1], settings["new"], settings["rounds"]
  steps, zero = np.int32(new), np.float32(0.0)
  prefill, decode, gen = {}, {}, {}
  for dtype, program in programs.items():
    jit = jits[dtype]
    prefill[f"program {dtype}"] = partial(serving[dtype].functions[f"prefill_{bucket}"], padded, length)
    prefill[f"program {dtype} with generate"] = partial(program.functions[f"prefill_{bucket}"], padded, length)
    prefill[f"jax.jit {dtype}"] = partial(jit["prefill"], padded, length)
    p_prefill, p_decode = serving[dtype].functions[f"prefill_{bucket}"], serving[dtype].functions["decode_step"]
    decode[f"program {dtype}"] = partial(_python_loop, p_prefill, p_decode, padded, length, new)
    decode[f"jax.jit {dtype}"] = partial(_python_loop, jit["prefill"], jit["decode_step"], padded, length, new)
    gen[f"program {dtype}"] = partial(program.functions[f"generate_{bucket}"], padded, length, steps, zero)
    gen[f"jax.jit {dtype}"] = partial(jit["generate"], padded, length, steps, zero)
  results = {"prefill s": interleaved(prefill, rounds=rounds, calls=3)}
  # The loop's own timer excludes its prefill: take the median of what it returns.
  loop_seconds = {name: [] for name in decode}
  for _ in range(rounds + 1):
    for name, run_loop in decode.items():
      loop_seconds[name].append(run_loop())
  results["decode loop s"] = {name: float(np.median(s[1:])) for name, s in loop_seconds.items()}
  results["generate s"] = interleaved(gen, rounds=rounds, calls=1)
  results["decode tok/s loop"] = {k: new / s for k, s in results["decode loop s"].items()}
  prefill_in = {k: f"{k} with generate" if k.startswith("program") else k for k in results["generate s"]}
  results["decode tok/s generate"] = {
    k: new / max(s - results["prefill s"][prefill_in[k]], 1e-9) for k, s in results["generate s"].items()
  }
  return results


def _parity(models: dict[str, GPT], programs: dict[str, Any], prompt: np.ndarray, new: int) -> dict[str, float]:
  """int8 against float32: teacher-forced logits on the float32 program's greedy tokens, and free-running tokens."""
  f32_tokens = decode_loop(programs["f32"], prompt, new)
  int8_tokens = decode_loop(programs["int8"], prompt, new)
  sequence = jnp.asarray(np.concatenate([prompt, f32_tokens], axis=1))
  forward = nnx.jit(lambda model, tokens: model(tokens))
  f32_logits = forward(models["f32"], sequence)[:, prompt.shape[1] - 1 : -1]
  int8_logits = forward(models["int8"], sequence)[:, prompt.shape[1] - 1 : -1]
  error = jnp.abs(int8_logits - f32_logits)
  diverged = np.flatnonzero(int8_tokens[0] != f32_tokens[0])
  return {
    "max logit error": float(error.max()),
    "max |logit| f32": float(jnp.abs(f32_logits).max()),
    "top-1 agreement (teacher-forced)": float(jnp.mean(jnp.argmax(int8_logits, -1) == jnp.argmax(f32_logits, -1))),
    "free-running tokens equal": float(np.mean(int8_tokens == f32_tokens)),
    "free-running first divergence": int(diverged[0]) if diverged.size else new,
  }


def run(out_dir: str | os.PathLike, quick: bool = False) -> dict[str, Any]:
  """All the figures of the module docstring; artifacts are saved under ``out_dir``. ``quick``: the tiny config."""
  settings = _settings(quick)
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  config = ["--config", settings["config"]]
  results: dict[str, Any] = {"config": settings["config"], "prompt": settings["prompt"], "new tokens": settings["new"]}
  with tempfile.TemporaryDirectory() as cache:
    export = {}
    for name, dtype, target, extra in [
      ("f32 cpu cold", "f32", "cpu", ["--save", str(out / "gpt_f32")]),
      ("f32 cpu cached", "f32", "cpu", []),
      ("int8 cpu", "int8", "cpu", ["--save", str(out / "gpt_int8")]),
      ("f32 metal", "f32", "metal", []),
      ("int8 metal", "int8", "metal", []),
    ]:
      export[name] = _phase(
        "--phase", "export", *config, "--dtype", dtype, "--target", target, "--cache", cache, *extra
      )
      print(f"llm export {name}: {export[name]['export s']:.1f} s", flush=True)
  results["export"] = export
  results["load"] = _phase("--phase", "load", "--artifact", str(out / "gpt_f32"))
  print(f"llm load: {results['load']['load s']:.1f} s", flush=True)

  models = {dtype: _model(settings["config"], dtype) for dtype in ("f32", "int8")}
  artifacts = {dtype: nnxc.runtime.Artifact.open(out / f"gpt_{dtype}") for dtype in models}
  programs = {dtype: artifact.load() for dtype, artifact in artifacts.items()}
  results["driver"] = programs["f32"].driver
  prompt = np.asarray(
    jax.random.randint(jax.random.key(0), (1, settings["prompt"]), 0, models["f32"].config.vocab_size)
  )
  padded, length = pad_prompt(prompt, settings["buckets"])
  jits = {dtype: _jitted(model, settings) for dtype, model in models.items()}
  serving = {
    dtype: nnxc.export(
      model, generation_functions(model, buckets=settings["buckets"], max_new=settings["new"], generate=False)
    ).load()
    for dtype, model in models.items()
  }
  results["speed"] = _speed(programs, serving, jits, settings, padded, length)
  print("llm speed done", flush=True)
  results["parity"] = _parity(models, programs, prompt, settings["new"])
  (out / "bench_llm.json").write_text(json.dumps(results, indent=1))
  (out / "bench_llm.md").write_text(markdown(results))
  return results


def markdown(results: dict[str, Any]) -> str:
  """The ``--llm`` tables: export and load, speed against jax.jit, int8 parity."""
  export, load, speed, parity = results["export"], results["load"], results["speed"], results["parity"]
  mb = 1024 * 1024
  lines = [
    f"## GPT ({results['config']}): export, generation, int8",
    "",
    f"Prompt {results['prompt']} tokens, {results['new tokens']} new tokens, batch 1, cpu target "
    f"(`{results['driver']}`). Ratios are from interleaved runs in one process; the Python decode "
    "loop runs on a program exported without `generate` (a module without a loop: see `_speed`).",
    "",
    "| build | export s | iree-compile s | peak RSS MB | race check | dispatches |",
    "|---|---|---|---|---|---|",
  ]
  for name, row in export.items():
    dispatches = ", ".join(f"{k} {v}" for k, v in row["dispatches"].items())
    rss = row["peak rss MB"]
    compiled = "cache hit" if "cached" in name else f"{row['compile s']:.1f}"
    lines.append(
      f"| {name} | {row['export s']:.1f} | {compiled} | {rss['self']:.0f} | {row['hazard check']} | {dispatches} |"
    )
  f32, int8 = export["f32 cpu cold"], export["int8 cpu"]
  lines += [
    "",
    "Peak RSS of the exporting Python process (iree-compile runs in a child process; the JSON has "
    "the children's peak, which counts the forked Python before it becomes iree-compile).",
  ]
  state_mb = load["state bytes"] / mb
  lines += [
    "",
    f"params.irpa: float32 {f32['params.irpa bytes'] / mb:.1f} MB, int8 {int8['params.irpa bytes'] / mb:.1f} MB "
    f"({f32['params.irpa bytes'] / int8['params.irpa bytes']:.2f}x smaller; the KV cache, float32, is in both). "
    f"Model build (random init) {f32['model build s']:.1f} s.",
    "",
    f"Loading the float32 artifact (state {state_mb:.0f} MB): `Artifact.open` {load['open s']:.2f} s, "
    f"peak RSS {load['rss before MB']:.0f} -> {load['peak rss after open MB']:.0f} MB; "
    f"`load()` {load['load s']:.2f} s, "
    f"peak RSS {load['peak rss after load MB']:.0f} MB: "
    f"{(load['peak rss after load MB'] - load['rss before MB']) / state_mb:.2f}x the state's bytes above the baseline.",
    "",
    "| | program f32 | jax.jit f32 | ratio | program int8 | jax.jit int8 | ratio |",
    "|---|---|---|---|---|---|---|",
  ]

  def row(label, key, scale, fmt, better_low):
    values = speed[key]
    cells = []
    for dtype in ("f32", "int8"):
      p, j = values[f"program {dtype}"] * scale, values[f"jax.jit {dtype}"] * scale
      ratio = p / j if better_low else j / p
      cells += [format(p, fmt), format(j, fmt), f"{ratio:.2f}"]
    lines.append(f"| {label} | {' | '.join(cells)} |")

  row(f"prefill {results['prompt']} tokens, ms", "prefill s", 1e3, ".1f", True)
  row("decode tok/s, Python loop over decode_step", "decode tok/s loop", 1, ".1f", False)
  row("decode tok/s inside generate", "decode tok/s generate", 1, ".1f", False)
  p = speed["decode tok/s loop"]
  g = speed["decode tok/s generate"]
  lines += [
    "",
    "Ratios are program time / jax.jit time (< 1: the program is faster).",
    f"generate vs the Python loop (program f32): {g['program f32'] / p['program f32']:.2f}x the tokens/s; "
    f"int8 vs float32 program decode: {p['program int8'] / p['program f32']:.2f}x (loop), "
    f"{g['program int8'] / g['program f32']:.2f}x (generate).",
    "",
    f"int8 against float32 over {results['new tokens']} greedy tokens: max logit error "
    f"{parity['max logit error']:.3f} (max |logit| {parity['max |logit| f32']:.2f}), top-1 agreement "
    f"{parity['top-1 agreement (teacher-forced)']:.1%} teacher-forced; free-running, the int8 program's tokens "
    f"equal the float32 program's for the first {parity['free-running first divergence']} "
    f"({parity['free-running tokens equal']:.1%} of positions equal).",
  ]
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m nnx_models.tools.bench_llm", description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("build/bench/llm"))
  parser.add_argument("--quick", action="store_true", help="the tiny config (seconds, not minutes)")
  parser.add_argument(
    "--phase", choices=["export", "load"], help=argparse.SUPPRESS
  )  # one measured step, in its own process
  parser.add_argument("--config", choices=["small", "tiny"], default="small", help=argparse.SUPPRESS)
  parser.add_argument("--dtype", choices=["f32", "int8"], default="f32", help=argparse.SUPPRESS)
  parser.add_argument("--target", default="cpu", help=argparse.SUPPRESS)
  parser.add_argument("--cache", help=argparse.SUPPRESS)
  parser.add_argument("--save", help=argparse.SUPPRESS)
  parser.add_argument("--artifact", help=argparse.SUPPRESS)
  options = parser.parse_args(argv)
  if options.phase:
    print(json.dumps((_export_phase if options.phase == "export" else _load_phase)(options)))
    return 0
  print(markdown(run(options.out, quick=options.quick)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
