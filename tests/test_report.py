"""The HTML inspection report renders in headless Chromium: the model tree, the parity table, the MSL."""

import dataclasses
import html
import pathlib
import shutil
import subprocess

import numpy as np
import optax
import pytest
from flax import nnx

import compile as nnxc
from nnx_models import MLP, ZOO
from tests.conftest import mse_train_step, skip_or_fail

BATCH = 4
SCREENSHOTS = pathlib.Path(__file__).parent.parent / "build" / "test-screenshots"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def chromium() -> str:
  path = shutil.which("chromium")
  if path is None:
    skip_or_fail("chromium", "chromium not installed (Debian packages chromium, chromium-driver)")
  return path


def _report(tmp_path) -> tuple[pathlib.Path, int]:
  args = ZOO["mlp"].example_args(BATCH, 0)
  functions = {mode: nnxc.method("__call__", *args, mode=mode) for mode in ("train", "eval")}
  nnxc.export(ZOO["mlp"].make(0), functions).save(tmp_path / "artifact")
  artifact = nnxc.Artifact.open(tmp_path / "artifact")
  calls = [("train", ZOO["mlp"].example_args(BATCH, 1)), ("eval", ZOO["mlp"].example_args(BATCH, 2))]
  report = nnxc.write_report(
    artifact, tmp_path / "report.html", program=artifact.load(), model=ZOO["mlp"].make(0), calls=calls
  )
  return report, len(calls)


def test_report_renders_in_headless_chromium(tmp_path):
  browser = chromium()
  report, calls = _report(tmp_path)
  url = report.resolve().as_uri()
  dom = subprocess.run(
    [browser, *CHROMIUM_FLAGS, "--virtual-time-budget=5000", "--dump-dom", url],
    capture_output=True,
    text=True,
    timeout=120,
  ).stdout
  # The treescope tree rendered (its text lives in a shadow root; the page's probe copies it out).
  assert 'data-treescope-containers="1"' in dom
  assert "MLP(" in dom and "BatchNorm" in dom
  # One parity row per output leaf of each call and per state variable, all within tolerance.
  num_state = len(nnxc.load_program(tmp_path / "artifact").artifact.state)
  assert dom.count('<tr class="parity">') == calls + num_state
  assert 'class="bad"' not in dom
  SCREENSHOTS.mkdir(parents=True, exist_ok=True)
  screenshot = SCREENSHOTS / "report.png"
  subprocess.run(
    [browser, *CHROMIUM_FLAGS, "--window-size=1200,1600", f"--screenshot={screenshot}", url],
    capture_output=True,
    timeout=120,
    check=True,
  )
  assert screenshot.stat().st_size > 20_000  # a rendered page, not a blank one


def test_report_shows_the_msl_of_each_metal_kernel(tmp_path):
  args = ZOO["mlp"].example_args(BATCH, 0)
  artifact = nnxc.export(ZOO["mlp"].make(0), {"eval": nnxc.method("__call__", *args, mode="eval")}, target="metal")
  page = nnxc.write_report(artifact, tmp_path / "metal.html").read_text()  # no Metal device needed
  executables = artifact.functions["eval"].executables
  assert executables and all(f"MSL of {name}" in page for name in executables)
  assert "kernel void" in page
  assert "No eager model was given" in page


def test_a_parity_error_is_highlighted(tmp_path):
  args = ZOO["linear"].example_args(BATCH, 0)
  program = nnxc.export(ZOO["linear"].make(0), {"f": nnxc.method("__call__", *args)}).load()
  program.set_arrays({"b": np.ones(5, np.float32)})  # the device now disagrees with the eager model
  model = ZOO["linear"].make(0)
  page = nnxc.write_report(program.artifact, tmp_path / "r.html", program=program, model=model, calls=[("f", args)])
  page = page.read_text()
  assert page.count('class="bad"') == 2  # the output and the bias


def test_manifest_text_is_escaped(tmp_path):
  """The model's description is free text (any string a manifest holds): the page shows it, never runs it as HTML."""
  args = ZOO["linear"].example_args(BATCH, 0)
  artifact = nnxc.export(ZOO["linear"].make(0), {"f": nnxc.method("__call__", *args)})
  script = "<script>alert(1)</script>"
  manifest = dataclasses.replace(artifact.manifest, model=script)
  page = nnxc.write_report(nnxc.Artifact(manifest, artifact.files, artifact.params), tmp_path / "r.html")
  page = page.read_text()
  assert script not in page
  assert html.escape(script) in page


def _objects():
  model = MLP(2, 16, 5, rngs=nnx.Rngs(0))
  return {"model": model, "optimizer": nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)}


@pytest.mark.usefixtures("standard_dtype_promotion")
def test_parity_of_a_dict_of_objects_replays_function_exports(tmp_path):
  """The README's {"model", "optimizer"} layout: a train step (compile.function) and a method, replayed eagerly."""
  x, y = np.ones((4, 2), np.float32), np.zeros((4, 5), np.float32)
  functions = {"train_step": nnxc.function(mse_train_step, x, y), "predict": nnxc.method("__call__", x, mode="eval")}
  program = nnxc.export(_objects(), functions).load()
  calls = [("train_step", (x, y)), ("train_step", (x, y)), ("predict", (x,))]
  with pytest.raises(ValueError, match=r"train_step, a compile\.function export: pass functions="):
    nnxc.write_report(program.artifact, tmp_path / "r.html", program=program, model=_objects(), calls=calls)
  page = nnxc.write_report(
    program.artifact, tmp_path / "r.html", program=program, model=_objects(), calls=calls,
    functions={"train_step": mse_train_step},
  ).read_text()  # fmt: skip
  assert 'class="bad"' not in page and "call 1: train_step output 0" in page and "optimizer.step" in page
