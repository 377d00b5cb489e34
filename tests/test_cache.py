"""The compile cache: unchanged programs skip iree-compile; corrupt entries and concurrent writers are safe."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import compile as nnxc
from nnx_models import ZOO

BATCH = 4


def _export(cache, seed: int = 0, batch: int = BATCH) -> nnxc.Artifact:
  args = ZOO["mlp"].example_args(batch, 0)
  return nnxc.export(ZOO["mlp"].make(seed), {"eval": nnxc.method("__call__", *args, mode="eval")}, cache=cache)


def test_an_unchanged_program_is_not_compiled_again(tmp_path):
  first, second = _export(tmp_path), _export(tmp_path)
  assert (first.from_cache, second.from_cache) == (False, True)
  assert first.vmfb == second.vmfb
  x = ZOO["mlp"].example_args(BATCH, 1)[0]
  np.testing.assert_array_equal(second.load().eval(x), first.load().eval(x))


def test_exports_from_two_call_sites_are_the_same_bytes(tmp_path):
  """JAX's outlined helpers (Dropout's ``_uniform``) carry the caller's stack in their location: it is dropped."""
  args = ZOO["mlp"].example_args(BATCH, 0)
  functions = {"train": nnxc.method("__call__", *args, mode="train")}
  first = nnxc.export(ZOO["mlp"].make(0), functions, target="cpu", cache=tmp_path)
  second = nnxc.export(ZOO["mlp"].make(0), functions, target="cpu", cache=tmp_path)
  assert second.from_cache and first.vmfb == second.vmfb


def test_other_weights_hit_the_cache_other_shapes_do_not(tmp_path):
  _export(tmp_path)
  other_weights = _export(tmp_path, seed=1)
  assert other_weights.from_cache  # weights live in params.irpa, not in the module
  assert not np.array_equal(other_weights.params["linear1.w"], _export(tmp_path).params["linear1.w"])
  assert not _export(tmp_path, batch=8).from_cache


def test_a_serial_compile_makes_the_same_module_and_hits_the_same_entry(tmp_path, monkeypatch):
  """NNX_METAL_COMPILE_SERIAL=1 (set for the test run) compiles on one thread: the same bytes, flags and cache key."""
  monkeypatch.setenv("NNX_METAL_COMPILE_SERIAL", "1")
  serial = _export(tmp_path / "serial")
  monkeypatch.setenv("NNX_METAL_COMPILE_SERIAL", "0")
  threaded = _export(tmp_path / "threaded")
  assert not serial.from_cache and not threaded.from_cache
  assert serial.vmfb == threaded.vmfb
  assert serial.manifest.flags == threaded.manifest.flags
  assert _export(tmp_path / "serial").from_cache  # a threaded export finds the serial compile's entry
  monkeypatch.setenv("NNX_METAL_COMPILE_SERIAL", "yes")
  with pytest.raises(nnxc.NnxMetalError, match="NNX_METAL_COMPILE_SERIAL='yes'"):
    _export(tmp_path / "misspelled")


def test_a_corrupt_entry_is_compiled_again(tmp_path):
  _export(tmp_path)
  (vmfb,) = tmp_path.glob("*/*/module.vmfb")
  vmfb.write_bytes(b"garbage")
  again = _export(tmp_path)
  assert not again.from_cache
  x = ZOO["mlp"].example_args(BATCH, 1)[0]
  again.load().eval(x)
  assert _export(tmp_path).from_cache


def test_two_processes_exporting_at_once_leave_one_good_entry(tmp_path):
  script = textwrap.dedent(
    f"""
    import compile as nnxc
    from nnx_models import ZOO
    args = ZOO["mlp"].example_args({BATCH}, 0)
    artifact = nnxc.export(ZOO["mlp"].make(0), {{"eval": nnxc.method("__call__", *args, mode="eval")}},
                           cache={str(tmp_path)!r})
    artifact.load().eval(*args)
    """
  )
  processes = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True) for _ in range(2)]
  for process in processes:
    assert process.wait(timeout=300) == 0, process.stderr.read()
  assert len(list(tmp_path.glob("*/*/binary.json"))) == 1
  assert [p for p in tmp_path.glob("*/.*")] == []  # no temporary directories left behind
  assert _export(tmp_path).from_cache


TRAIN_MLP_AFTER = textwrap.dedent(
  """
  import hashlib, json, sys
  import jax
  from flax import nnx
  import compile as nnxc
  from nnx_models import CATALOG, ZOO
  if sys.argv[2] == "after-another-model":  # JAX keeps the RNG helpers it traced here, with this model's frames
    entry = CATALOG["dropout"]
    nnx.jit(entry.calls["train"])(entry.objects(), *entry.inputs("train", 0))
  args = ZOO["mlp"].example_args(4, 0)
  artifact = nnxc.export(ZOO["mlp"].make(0), {"train": nnxc.method("__call__", *args, mode="train")}, cache=sys.argv[1])
  mlir = hashlib.sha256(artifact.files["module.mlir"]).hexdigest()
  print(json.dumps({"from_cache": artifact.from_cache, "mlir": mlir}))
  """
)


def test_a_program_traced_after_another_model_hits_the_cache(tmp_path):
  """The same program's locations depend on what the process traced before; its cache entry does not."""
  runs = []
  for history in ("alone", "after-another-model"):
    done = subprocess.run(
      [sys.executable, "-c", TRAIN_MLP_AFTER, str(tmp_path), history], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs.append(json.loads(done.stdout.splitlines()[-1]))
  assert runs[0]["mlir"] != runs[1]["mlir"]  # the locations differ (else this test tests nothing)
  assert [run["from_cache"] for run in runs] == [False, True]
