"""The zoo's tools, run as a user runs them: the Metal build (`nox -s metal`) and the benchmarks (`nox -s bench`)."""

import subprocess
import sys

import pytest


def tool(name: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", f"nnx_models.tools.{name}", *args], capture_output=True, text=True, timeout=900
  )


def bench(*args: str) -> subprocess.CompletedProcess:
  return tool("bench", *args)


def test_a_second_build_with_nothing_changed_reuses_the_artifacts(tmp_path):
  out = tmp_path / "metal"
  first = tool("build_zoo", "--target", "metal", "--out", str(out), "--only", "linear", "catalog_embed")
  assert first.returncode == 0, first.stderr
  manifests = {p.parent.name: p.read_bytes() for p in out.glob("*/manifest.json")}
  assert sorted(manifests) == ["catalog_embed", "linear"]
  second = tool("build_zoo", "--target", "metal", "--out", str(out), "--only", "linear", "catalog_embed")
  assert second.returncode == 0, second.stderr
  rows = [line for line in second.stdout.splitlines() if line.startswith(("linear ", "catalog_embed "))]
  assert rows and all(" reused " in row for row in rows), second.stdout
  assert {p.parent.name: p.read_bytes() for p in out.glob("*/manifest.json")} == manifests
  rebuilt = tool("build_zoo", "--target", "metal", "--out", str(out), "--only", "linear", "--rebuild")
  assert rebuilt.returncode == 0 and " reused " not in rebuilt.stdout, rebuilt.stdout


def test_a_quick_run_writes_the_tables(tmp_path):
  result = bench("--out", str(tmp_path), "--models", "linear", "--rounds", "1", "--calls", "2")
  assert result.returncode == 0, result.stderr
  assert (tmp_path / "bench.md").read_text().count("| linear |") == 4  # 3 batch sizes, 1 compile row
  assert (tmp_path / "bench.json").stat().st_size > 0


@pytest.mark.parametrize(
  ("args", "message"),
  [
    (["--models", "nope"], "--models: unknown model(s) 'nope'; choose from "),
    (["--realistic", "resnet50"], "--realistic: unknown model(s) 'resnet50'; choose from mlp_784_1024x4"),
    (["--models", "mlp", "nope", "linera"], "unknown model(s) 'nope', 'linera'; choose from"),
    (["--rounds", "0"], "argument --rounds: 0 is less than 1"),
    (["--calls", "-1"], "argument --calls: -1 is less than 1"),
    (["--rounds", "x"], "argument --rounds: 'x' is not an integer"),
  ],
)
def test_bad_arguments_are_refused_in_one_line(args, message):
  result = bench(*args)
  assert result.returncode == 2
  assert "Traceback" not in result.stderr
  assert message in result.stderr.strip().splitlines()[-1]


def test_out_that_is_a_file_is_refused(tmp_path):
  (tmp_path / "a_file").write_text("")
  result = bench("--models", "linear", "--out", str(tmp_path / "a_file"))
  assert result.returncode == 2
  assert "exists and is not a directory" in result.stderr
