"""The nnx-metal command: build, run, inspect, check; user mistakes are one line and exit 2."""

import hashlib
import importlib.metadata
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import tomllib

import numpy as np
import pytest
from flax import nnx

import compile as nnxc
from compile import _cli_inputs as cli_inputs
from compile import cli
from compile.runtime import Manifest
from nnx_models import MLP


def nnx_metal(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "compile.cli", *args], capture_output=True, text=True, timeout=600)


def test_the_console_script_imports_a_model_from_the_current_directory(tmp_path):
  """`nnx-metal build mymodel:Model` where mymodel.py is in the current directory, with no PYTHONPATH."""
  (tmp_path / "mymodel.py").write_text(
    "from flax import nnx\n\n\ndef Model(rngs):\n  return nnx.Linear(2, 3, rngs=rngs)\n"
  )
  script = pathlib.Path(sys.executable).parent / "nnx-metal"
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  result = subprocess.run(
    [str(script), "build", "mymodel:Model", "--input", "4x2xf32", "--target", "cpu", "--out", "out"],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr
  assert (tmp_path / "out" / "manifest.json").exists()


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


@pytest.mark.parametrize("command", ["build", "run", "inspect", "check"])
def test_help_of_each_subcommand_stands_on_its_own(command):
  result = nnx_metal(command, "--help")
  assert result.returncode == 0
  assert f"usage: nnx-metal {command}" in result.stdout
  assert len(result.stdout.splitlines()) > 4


# Bad arguments, table-driven: every user mistake is one line on stderr, exit status 2, no traceback.

USER_MODULES = {
  "cli_syntax_error": "def broken(:\n",
  "cli_import_error_inside": "from os import no_such_name\n",
  "cli_missing_dependency": "import no_such_dependency_of_the_user\n",
  "cli_raises_at_import": "raise RuntimeError('configuration file not found')\n",
  "cli_name_error": "undefined_name + 1\n",
  "cli_factories": """
import jax.numpy as jnp
from flax import nnx


def raises(*, rngs):
  raise ValueError("the factory broke")


def raises_empty(*, rngs):
  raise RuntimeError()


def raises_multiline(*, rngs):
  raise RuntimeError("first line\\nsecond line\\nthird line")


def raises_key_error(*, rngs):
  return {}["missing"]


def returns_int(*, rngs):
  return 3


def returns_none(*, rngs):
  return None


NOT_CALLABLE = 3


class Model(nnx.Module):
  def __init__(self, *, rngs):
    self.w = nnx.Param(jnp.ones((2, 3)))
    self.size = 3
    self.deterministic = True

  def __call__(self, x):
    return x @ self.w

  def rejects(self, x):
    raise ValueError("Model.rejects takes nothing")

  def branchy(self, x):
    if x.sum() > 0:
      return x
    return -x

  def eval_only(self, x):
    if not self.deterministic:
      raise NotImplementedError("no train mode")
    return x @ self.w

  def multiline(self, x):
    raise ValueError("line one\\nline two\\nline three")


class Factory:
  @staticmethod
  def create(*, rngs):
    return Model(rngs=rngs)
""",
}


@pytest.fixture(scope="module")
def workspace(built, tmp_path_factory):
  """User modules, .npy files of every kind and broken artifacts, for the bad-argument cases."""
  ws = tmp_path_factory.mktemp("bad-arguments")
  (ws / "user").mkdir()
  for name, source in USER_MODULES.items():
    (ws / "user" / f"{name}.py").write_text(source)
  x = np.zeros((8, 2), np.float32)
  np.save(ws / "x.npy", x)
  np.save(ws / "x83.npy", np.zeros((8, 3), np.float32))
  np.save(ws / "x64.npy", x.astype(np.float64))
  np.save(ws / "big.npy", np.zeros((1000, 1000), np.float32))
  np.save(ws / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
  np.savez(ws / "x.npz", x=x)
  full = (ws / "x.npy").read_bytes()
  (ws / "truncated.npy").write_bytes(full[:-10])
  (ws / "bad_header.npy").write_bytes(full[:10] + b"{'descr': not python}".ljust(len(full) - 10))
  (ws / "magic_only.npy").write_bytes(full[:8])
  (ws / "text.npy").write_text("1 2 3\n4 5 6\n")
  (ws / "empty.npy").write_bytes(b"")
  # A header that claims 100000x100000 float32 (40 GB) over 8 bytes of data.
  header = "{'descr': '<f4', 'fortran_order': False, 'shape': (100000, 100000), }".ljust(117) + "\n"
  (ws / "claims_40gb.npy").write_bytes(
    b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + bytes(8)
  )
  (ws / "a_file").write_text("not a directory")
  (ws / "not_an_artifact").mkdir()
  (ws / "not_an_artifact" / "notes.txt").write_text("mine")
  (ws / "empty_dir").mkdir()
  (ws / "report_dir").mkdir()
  (ws / "folder.npy").mkdir()
  os.mkfifo(ws / "fifo.npy")  # opened by nothing: reading or writing it would block

  def broken(name, change):
    shutil.copytree(built, ws / name)
    change(ws / name)

  def edit_manifest(directory, edit):
    manifest = json.loads((directory / "manifest.json").read_text())
    edit(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))

  def garbage_spirv(directory):  # named after one of the module's kernels, as every kernel file must be
    kernel = json.loads((directory / "manifest.json").read_text())["dispatches"][0]
    (directory / "spirv").mkdir()
    (directory / "spirv" / f"{kernel}.spv").write_bytes(b"not SPIR-V at all")
    digest = hashlib.sha256(b"not SPIR-V at all").hexdigest()
    edit_manifest(directory, lambda m: m["files"].update({f"spirv/{kernel}.spv": digest}))

  def manifest_dir(directory):
    (directory / "manifest.json").unlink()
    (directory / "manifest.json").mkdir()

  broken("no_module", lambda d: (d / "module.vmfb").unlink())
  broken("corrupt_module", lambda d: (d / "module.vmfb").write_bytes(b"\0" * 64))
  broken("garbage_manifest", lambda d: (d / "manifest.json").write_text("this is not JSON"))
  broken("foreign_manifest", lambda d: (d / "manifest.json").write_text('{"format": "something else"}'))
  broken("manifest_is_dir", manifest_dir)
  broken("edited_manifest", lambda d: edit_manifest(d, lambda m: m["functions"]["eval"].update(dispatch_count=-1)))
  broken("garbage_spirv", garbage_spirv)
  return ws


# The bad-argument cases are data (tests/cli_cases.toml): name = (argv, text the one-line message must hold; it
# names the offending argument). {built}: the MLP artifact (eval takes float32[8, 2]); {ws}: the workspace above,
# whose user/ folder is on the path.
CASES = tomllib.loads((pathlib.Path(__file__).parent / "cli_cases.toml").read_text())
SPLICES = CASES["splices"]


def _cases(section: str) -> dict[str, tuple[list[str], str]]:
  """A table of cases, each argument "*NAME" replaced by the arguments of splice NAME."""

  def expand(argv: list[str]) -> list[str]:
    return [a for arg in argv for a in (SPLICES[arg[1:]] if arg.startswith("*") else [arg])]

  return {name: (expand(argv), message) for name, (argv, message) in CASES[section].items()}


# Mistakes the CLI finds itself; the ones whose arguments are computed stay here.
BAD_ARGUMENTS = {
  **_cases("bad_arguments"),
  "--seed out of range": (["build", "nnx_models:MLP", "--seed", str(2**64), "--out", "x"], f"--seed {2**64} is out"),
  "huge dimension": ([*SPLICES["BUILD_MLP"], "--input", f"{10**20}x2xf32"], "is larger than 2**40"),
  "fill with 5000 digits": ([*SPLICES["RUN"], "--input", "8x2xi64=" + "9" * 5000], "is out of range for int64"),
  "--args with 5000 digits": (
    ["build", "nnx_models:MLP", "--args", "9" * 5000, "--out", "x"],
    "cannot be read (ValueError",
  ),
  "--args 3000 deep": (["build", "nnx_models:MLP", "--args", "[" * 3000 + "]" * 3000, "--out", "x"], "(RecursionError"),
  "dimension with 5000 digits": (
    [*SPLICES["RUN"], "--input", "9" * 5000 + "xf32"],
    "dimension 99999999...(5000 digits) is larger",
  ),
}

# argparse's own usage errors: usage, then one error line, exit status 2.
USAGE_ERRORS = _cases("usage_errors")

# A few of the cases again through a real process, as a user runs them.
IN_A_PROCESS = [
  "factory raises",
  "import error inside module",
  "shape the model rejects",
  "negative dimension",
  "--method missing",
  "@ corrupt header",
  "check garbage SPIR-V",
]


def _format(args: list[str], built, ws) -> list[str]:
  return [a.format(built=built, ws=ws) for a in args]


def _no_allocation(*args, **kwargs):
  raise AssertionError("an --input array was allocated before the mistake was found")


def run_in_process(argv: list[str], capsys) -> tuple[int, str]:
  try:
    status = cli.main(argv)
  except SystemExit as e:  # argparse
    status = e.code
  return status, capsys.readouterr().err


def assert_one_line(status: int, stderr: str, message: str) -> None:
  assert "Traceback" not in stderr, stderr
  assert status == 2, stderr
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert len(lines) == 1, stderr
  assert lines[0].startswith(
    (
      "nnx-metal: error: ",
      "nnx-metal build: ",
      "nnx-metal run: ",
      "nnx-metal inspect: ",
      "nnx-metal check: ",
    )
  ), stderr
  assert message in lines[0], stderr


def test_there_are_many_bad_argument_cases():
  assert len(BAD_ARGUMENTS) + len(USAGE_ERRORS) >= 66


@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_bad_arguments_are_one_line_with_exit_status_2(case, built, workspace, capsys, monkeypatch):
  monkeypatch.syspath_prepend(str(workspace / "user"))
  monkeypatch.setattr(cli_inputs.InputValue, "array", _no_allocation)  # every mistake is found before an input is made
  monkeypatch.chdir(workspace)
  args, message = BAD_ARGUMENTS[case]
  status, stderr = run_in_process(_format(args, built, workspace), capsys)
  assert_one_line(status, stderr, message.format(built=built, ws=workspace))


@pytest.mark.parametrize("case", USAGE_ERRORS)
def test_argparse_usage_errors_exit_2_without_a_traceback(case, built, workspace, capsys):
  args, message = USAGE_ERRORS[case]
  status, stderr = run_in_process(_format(args, built, workspace), capsys)
  assert status == 2 and "Traceback" not in stderr
  assert stderr.startswith("usage: nnx-metal") and message in stderr.strip().splitlines()[-1], stderr


@pytest.mark.parametrize("case", IN_A_PROCESS)
def test_bad_arguments_through_the_command(case, built, workspace):
  args, message = BAD_ARGUMENTS[case]
  path = [str(workspace / "user"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
  result = subprocess.run(
    [sys.executable, "-m", "compile.cli", *_format(args, built, workspace)],
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
    cwd=workspace,
  )
  assert_one_line(result.returncode, result.stderr, message.format(built=built, ws=workspace))
  assert result.stdout == ""


def test_run_refuses_a_huge_input_before_allocating_it(built, capsys, monkeypatch):
  monkeypatch.setattr(cli_inputs.InputValue, "array", _no_allocation)
  start = time.perf_counter()
  status, stderr = run_in_process(["run", str(built), "--function", "eval", "--input", "100000x100000xf32"], capsys)
  assert time.perf_counter() - start < 5
  assert "MemoryError" not in stderr
  assert_one_line(
    status,
    stderr,
    "nnx-metal run: SignatureError: eval input args[0]: expected float32[8, 2], got float32[100000, 100000]",
  )


def test_run_fills_inputs_and_saves_where_np_save_would(built, tmp_path, capsys):
  status = cli.main(
    ["run", str(built), "--function", "eval", "--input", "8x2xf32=0.5", "--output", str(tmp_path / "y")]
  )
  assert status == 0, capsys.readouterr().err
  assert "result[0]: float32[8, 5]" in capsys.readouterr().out
  model = MLP(2, 16, 5, rngs=nnx.Rngs(0))
  model.eval()
  expected = model(np.full((8, 2), 0.5, np.float32))
  np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
  "spec, shape, dtype, fill",
  [
    ("f32", (), "float32", 0),
    ("0x3xf32", (0, 3), "float32", 0),
    ("2x3xbf16=-1.5", (2, 3), "bfloat16", -1.5),
    ("4xf16=nan", (4,), "float16", float("nan")),
    ("4xf32=-inf", (4,), "float32", float("-inf")),
    ("2xi8=-128", (2,), "int8", -128),
    ("2xu64=18446744073709551615", (2,), "uint64", 2**64 - 1),
    ("3xi1=true", (3,), "bool", True),
  ],
)
def test_input_values_parse_then_fill(spec, shape, dtype, fill):
  value = cli_inputs.parse_input(spec)
  assert (value.shape, value.dtype) == (shape, dtype)
  np.testing.assert_array_equal(value.array(), np.full(shape, fill, dtype=dtype))


def test_internal_errors_keep_their_traceback(built, tmp_path, monkeypatch, capsys):
  """Only the user's mistakes become one line: a bug of nnx-metal's own (here, in export) still raises."""

  def broken_export(*args, **kwargs):
    raise RuntimeError("a bug in nnx-metal")

  monkeypatch.setattr("compile._export.export", broken_export)
  with pytest.raises(RuntimeError, match="a bug in nnx-metal"):
    cli.main(["build", "nnx_models:MLP", "--args", "2,16,5", "--input", "8x2xf32", "--out", str(tmp_path / "m")])
