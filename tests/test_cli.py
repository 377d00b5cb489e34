"""The nnx-metal command: build, run, inspect, bench; user mistakes are one line and exit 2."""

import importlib.metadata
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import compile as nnxc
from compile.runtime import Manifest
from nnx_models import MLP


def nnx_metal(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "compile.cli", *args], capture_output=True, text=True, timeout=600)


def test_the_console_script_is_installed():
  (script,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "nnx-metal"]
  assert script.value == "compile.cli:main"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  out = tmp_path_factory.mktemp("cli") / "mlp"
  result = nnx_metal(
    "build", "nnx_models:MLP", "--args", "2,16,5", "--input", "8x2xf32", "--target", "cpu", "--out", str(out)
  )
  assert result.returncode == 0, result.stderr
  assert "lowering and compiling MLP.__call__ for cpu" in result.stderr and "done in" in result.stderr
  assert "eval: 2 dispatches" in result.stdout
  return out


def test_build_then_run_matches_eager(built, tmp_path):
  np.save(tmp_path / "x.npy", np.linspace(-1, 1, 16, dtype=np.float32).reshape(8, 2))
  result = nnx_metal(
    "run", str(built), "--function", "eval", "--input", f"@{tmp_path / 'x.npy'}", "--output", str(tmp_path / "y.npy")
  )
  assert result.returncode == 0, result.stderr
  assert "result[0]: float32[8, 5]" in result.stdout
  model = MLP(2, 16, 5, rngs=nnx.Rngs(0))
  model.eval()
  np.testing.assert_allclose(np.load(tmp_path / "y.npy"), model(np.load(tmp_path / "x.npy")), rtol=2e-5, atol=2e-5)


def test_inspect_lists_functions_and_state(built):
  result = nnx_metal("inspect", str(built))
  assert result.returncode == 0, result.stderr
  assert "eval(args[0]: float32[8, 2]) -> (outputs: float32[8, 5]): 2 dispatches" in result.stdout
  assert "bn.mean" in result.stdout and "BatchStat" in result.stdout
  printed = Manifest.from_json(nnx_metal("inspect", str(built), "--json").stdout)
  assert nnxc.Artifact.open(built).manifest == printed


def test_inspect_writes_the_html_report(built, tmp_path):
  result = nnx_metal("inspect", str(built), "--html", str(tmp_path / "report.html"))
  assert result.returncode == 0, result.stderr
  page = (tmp_path / "report.html").read_text()
  assert "treescope" in page and "State by Variable type" in page and "eval(args[0]: float32[8, 2])" in page


@pytest.mark.parametrize(
  "args, message",
  [
    (["run", "{built}", "--function", "predict"], "has no function 'predict'; it has train, eval"),
    (["run", "{built}", "--function", "eval", "--input", "8x3xf32"], "SignatureError: eval input args[0]: expected"),
    (["run", "{built}", "--function", "eval", "--input", "8x2xq8"], "unknown element type 'q8'"),
    (["run", "/nonexistent", "--function", "eval"], "ArtifactError: /nonexistent is not an nnx-metal artifact"),
    (["build", "nnx_models:Nope", "--input", "2xf32", "--out", "x"], "nnx_models has no callable 'Nope'"),
    (["build", "no_such_module:f", "--input", "2xf32", "--out", "x"], "cannot import 'no_such_module'"),
    (["build", "nnx_models:MLP", "--args", "2", "--input", "2xf32", "--out", "x"], "check --args"),
  ],
)
def test_user_mistakes_are_one_line_with_exit_status_2(built, args, message):
  result = nnx_metal(*[a.format(built=built) for a in args])
  assert result.returncode == 2
  assert message in result.stderr
  assert "Traceback" not in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["build", "run", "inspect", "bench"])
def test_help_of_each_subcommand_stands_on_its_own(command):
  result = nnx_metal(command, "--help")
  assert result.returncode == 0
  assert f"usage: nnx-metal {command}" in result.stdout
  assert len(result.stdout.splitlines()) > 4


def test_bench_runs_through_the_cli(tmp_path):
  result = nnx_metal("bench", "--out", str(tmp_path), "--models", "linear", "--rounds", "1", "--calls", "2")
  assert result.returncode == 0, result.stderr
  assert (tmp_path / "bench.md").read_text().count("| linear |") == 4  # 3 batch sizes, 1 compile row
