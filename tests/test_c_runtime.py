"""The C runtime (compile/runtime/c/nnx_metal.h): an artifact run without Python equals the Python Program.

IREE's runtime is built once from the vendored snapshot (cached by its sha256 and the patches),
with the library and the test programs of tests/c/. ``nnx_run`` drives the library's API from
the command line; every output and every state variable it produces is compared bit for bit
with ``compile.runtime.Program`` on the same artifact, inputs and driver. Required in CI
(NNX_METAL_REQUIRE=c-runtime): without the snapshot, CMake or a C compiler these tests fail there.
"""

import gc
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import compile as nnxc
import compile.runtime
from compile.runtime import deploy
from nnx_models import MLP, REALISTIC, ZOO
from tests.c_build import build_test_programs
from tests.conftest import TOLERANCES, assert_trees_allclose, mse_train_step, require_device, skip_or_fail

REQUIREMENT = "c-runtime"
ADAMW_STEPS = 10
ADAMW_LR = 1e-2
# Each driver a target's artifact runs on, as the parametrization of the parity tests.
RUNS = [("cpu", "local-sync"), ("cpu", "local-task"), ("metal-vulkan", "vulkan")]


@pytest.fixture(scope="session")
def c_build():
  """IREE's runtime, the library and tests/c built once per cache entry: ``{program: path}``."""
  try:
    return build_test_programs()
  except deploy.BuildError as e:
    skip_or_fail(REQUIREMENT, str(e))


def run_c(c_build, *args, check=True) -> subprocess.CompletedProcess:
  result = subprocess.run([str(c_build["nnx_run"]), *map(str, args)], capture_output=True, text=True, timeout=600)
  assert result.returncode >= 0, f"nnx_run died of signal {-result.returncode}: {result.stderr[-2000:]}"
  if check:
    assert result.returncode == 0, result.stderr[-2000:]
  return result


def _inputs(spec: "compile.runtime.Function", rng: np.random.Generator) -> list[np.ndarray]:
  arrays = []
  for tensor in spec.inputs:
    dtype = np.dtype(tensor.dtype)
    if dtype.kind == "f":
      arrays.append(rng.normal(size=tensor.shape).astype(dtype))
    elif dtype.kind in "iu":
      arrays.append(rng.integers(0, 10, size=tensor.shape).astype(dtype))
    else:
      arrays.append(rng.integers(0, 2, size=tensor.shape).astype(dtype))
  return arrays


def c_session(c_build, artifact_dir, driver, calls, tmp: pathlib.Path, *, save: pathlib.Path | None = None):
  """Runs ``calls`` (``[(function, inputs)]``) in one nnx_run process; returns each call's outputs, in order."""
  artifact = nnxc.Artifact.open(artifact_dir)
  commands = []
  for k, (name, inputs) in enumerate(calls):
    for i, array in enumerate(inputs):
      np.ascontiguousarray(array).tofile(tmp / f"in{k}_{i}.bin")
    commands += ["call", name, tmp / f"in{k}_", tmp / f"out{k}_"]
  if save is not None:
    commands += ["save", save]
  run_c(c_build, artifact_dir, "--driver", driver, *commands)
  results = []
  for k, (name, _) in enumerate(calls):
    outputs = artifact.functions[name].outputs
    results.append(
      [np.fromfile(tmp / f"out{k}_{i}.bin", np.dtype(t.dtype)).reshape(t.shape) for i, t in enumerate(outputs)]
    )
  return results


def python_session(artifact_dir, driver, calls):
  program = nnxc.load_program(artifact_dir, device=driver)
  results = []
  for name, inputs in calls:
    function = program.functions[name]
    results.append(function.run_flat(function.flat_inputs(tuple(inputs))))  # flat, as C returns them
  return program, results


def _bits(array: np.ndarray) -> np.ndarray:
  """The bytes of an array: equal bits, not equal values (NaN equals NaN, -0.0 is not 0.0)."""
  return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def assert_same_run(c_build, artifact_dir, driver, calls, tmp):
  """C and Python, same calls: outputs and the final state equal bit for bit (the state through a C save)."""
  saved = tmp / "saved"
  got = c_session(c_build, artifact_dir, driver, calls, tmp, save=saved)
  program, want = python_session(artifact_dir, driver, calls)
  for k, (name, _) in enumerate(calls):
    for i, (a, b) in enumerate(zip(got[k], want[k], strict=True)):
      assert a.dtype == b.dtype and a.shape == b.shape, f"{name} output {i}"
      np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=f"call {k} {name} output {i}")
  # The saved state read from the archive on the host: one device program per comparison (lavapipe has lost
  # its device with many programs alive in one process).
  saved_artifact = nnxc.Artifact.open(saved)
  c_state = {v.name: saved_artifact.params[v.global_name] for v in saved_artifact.state}
  python_state = program.arrays()
  del program
  gc.collect()
  assert c_state.keys() == python_state.keys()
  for name in python_state:
    np.testing.assert_array_equal(_bits(c_state[name]), _bits(python_state[name]), err_msg=name)
  return saved


def _device(target: str) -> None:
  if target != "cpu":
    require_device(target)


# Artifacts, compiled once per session (and worker).


@pytest.fixture(scope="session")
def zoo_artifacts(tmp_path_factory):
  built = {}

  def get(target: str) -> dict[str, pathlib.Path]:
    if target not in built:
      root = tmp_path_factory.mktemp(f"zoo-{target}")
      for name, entry in ZOO.items():
        args = entry.example_args(8, 0)
        functions = {mode: nnxc.method("__call__", *args, mode=mode) for mode in ("train", "eval")}
        nnxc.export(entry.make(0), functions, target=target).save(root / name)
      built[target] = {name: root / name for name in ZOO}
    return built[target]

  return get


def _adamw_objects():
  model = MLP(2, 16, 5, rngs=nnx.Rngs(0))
  return {"model": model, "optimizer": nnx.Optimizer(model, optax.adamw(ADAMW_LR), wrt=nnx.Param)}


X = np.asarray(jax.random.normal(jax.random.key(0), (8, 2)))
Y = np.asarray(jax.random.normal(jax.random.key(1), (8, 5)))


@pytest.fixture(scope="session")
def adamw_artifacts(tmp_path_factory):
  built = {}

  def get(target: str) -> pathlib.Path:
    if target not in built:
      functions = {
        "train_step": nnxc.function(mse_train_step, X, Y),
        "predict": nnxc.method("__call__", X, mode="eval"),
      }
      path = tmp_path_factory.mktemp(f"adamw-{target}") / "mlp_adamw"
      with jax.numpy_dtype_promotion("standard"):  # optax's AdamW adds Python floats to int32 counts
        nnxc.export(_adamw_objects(), functions, target=target).save(path)
      built[target] = path
    return built[target]

  return get


# Parity.


@pytest.mark.parametrize(("target", "driver"), RUNS)
def test_zoo_programs_match_the_python_program(c_build, zoo_artifacts, target, driver, tmp_path):
  _device(target)
  rng = np.random.default_rng(0)
  for name, directory in zoo_artifacts(target).items():
    artifact = nnxc.Artifact.open(directory)
    calls = [(fn, _inputs(spec, rng)) for _ in range(2) for fn, spec in artifact.functions.items()]
    (tmp_path / name).mkdir()
    assert_same_run(c_build, directory, driver, calls, tmp_path / name)


@pytest.mark.parametrize(("target", "driver"), RUNS)
def test_adamw_train_step_resident_in_c_merges_back_into_the_eager_model(
  c_build, adamw_artifacts, target, driver, tmp_path
):
  """C trains 10 steps and saves; Python opens the save and program.update(objects) equals 10 eager steps."""
  _device(target)
  directory = adamw_artifacts(target)
  calls = [("train_step", [X, Y])] * ADAMW_STEPS + [("predict", [X])]
  saved = assert_same_run(c_build, directory, driver, calls, tmp_path)
  eager = _adamw_objects()
  with jax.numpy_dtype_promotion("standard"):
    for _ in range(ADAMW_STEPS):
      nnx.jit(mse_train_step)(eager["model"], eager["optimizer"], X, Y)
  merged = _adamw_objects()
  nnxc.load_program(saved, device=driver).update(merged)
  got = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(merged))}
  for path, variable in nnx.to_flat_state(nnx.state(eager)):
    name = ".".join(map(str, path))
    # linear1.b feeds BatchNorm: its true gradient is 0 and the computed one rounding noise whose sign differs
    # between XLA and IREE; Adam turns it into a full +-lr step, inherited by the running mean (test_programs.py).
    noise_fed = name in ("model.linear1.b", "model.bn.mean")
    tolerance = dict(rtol=0, atol=2 * ADAMW_LR * ADAMW_STEPS) if noise_fed else TOLERANCES[target]
    assert_trees_allclose({name: got[name]}, {name: variable.get_value()}, **tolerance)


@pytest.mark.parametrize("driver", ["local-sync", "local-task"])
@pytest.mark.usefixtures("standard_dtype_promotion")
def test_realistic_transformer_train_step_matches_the_python_program(c_build, driver, tmp_path):
  entry = REALISTIC["transformer_2x256"]
  calls = entry.calls()
  functions = {name: nnxc.function(fn, *args) for name, (fn, args) in calls.items()}
  directory = tmp_path / "transformer"
  nnxc.export(entry.objects(), functions, target="cpu").save(directory)
  sequence = [(name, [np.asarray(a) for a in args]) for _ in range(2) for name, (fn, args) in calls.items()]
  (tmp_path / "run").mkdir()
  assert_same_run(c_build, directory, driver, sequence, tmp_path / "run")


def test_bucketed_and_structured_programs_run_in_c_and_symbolic_ones_are_refused(c_build, tmp_path):
  """Buckets are static functions (eval__b1, eval__b8) and an nnx.State output flattens by path: both run in C.

  A symbolic dimension needs shapes per call, which the C API does not take: refused at open, naming the fix.
  """
  model = MLP(2, 16, 5, rngs=nnx.Rngs(0))
  model.eval()
  spec = jax.ShapeDtypeStruct((jax.export.symbolic_shape("b", constraints=("b <= 16",))[0], 2), np.float32)
  functions = {
    "eval": nnxc.method("__call__", spec, buckets=(1, 8)),
    "grads": nnxc.function(lambda m, x: nnx.grad(lambda m: m(x).sum())(m), X),  # returns an nnx.State
  }
  nnxc.export(model, functions).save(tmp_path / "kinds")
  (tmp_path / "run").mkdir()
  calls = [("eval__b1", [X[:1]]), ("eval__b8", [X]), ("grads", [X])]
  assert_same_run(c_build, tmp_path / "kinds", "local-sync", calls, tmp_path / "run")
  nnxc.export(model, {"eval": nnxc.method("__call__", spec)}).save(tmp_path / "symbolic")
  refused = run_c(c_build, tmp_path / "symbolic", "info", check=False)
  assert refused.returncode == 10 + 3, refused.stderr
  assert "args[0] has a symbolic dimension" in refused.stderr and "buckets=(1, 8, 32)" in refused.stderr


# State by name, threads.


def test_state_is_read_and_written_by_name(c_build, adamw_artifacts, tmp_path):
  directory = adamw_artifacts("cpu")
  program = nnxc.load_program(directory, device="local-sync")
  weights = program.arrays()["model.linear2.w"]
  new = (weights * -2 + 1).astype(np.float32)
  new.tofile(tmp_path / "w.bin")
  X.tofile(tmp_path / "x0.bin")
  run_c(
    c_build,
    directory,
    "--driver",
    "local-sync",
    "set",
    "model.linear2.w",
    tmp_path / "w.bin",
    "get",
    "model.linear2.w",
    tmp_path / "back.bin",
    "call",
    "predict",
    tmp_path / "x",
    tmp_path / "y",
  )
  np.testing.assert_array_equal(np.fromfile(tmp_path / "back.bin", np.float32).reshape(new.shape), new)
  program.set_arrays({"model.linear2.w": new})
  np.testing.assert_array_equal(np.fromfile(tmp_path / "y0.bin", np.float32).reshape(8, 5), program.predict(X))
  wrong_name = run_c(c_build, directory, "get", "model.nope", tmp_path / "n.bin", check=False)
  assert (
    wrong_name.returncode == 10 + 8 and "NNX_ERROR_STATE" in wrong_name.stderr and "model.nope" in wrong_name.stderr
  )
  (tmp_path / "short.bin").write_bytes(b"\0" * 12)
  wrong_size = run_c(c_build, directory, "set", "model.linear2.w", tmp_path / "short.bin", check=False)
  assert wrong_size.returncode == 10 + 8 and "got 12 bytes" in wrong_size.stderr


def test_a_constant_written_by_name_reloads_with_the_written_state_kept(c_build, zoo_artifacts, tmp_path):
  """StatefulLinear's w is written by no function (constant on the device); its count by every call.

  Writing w loads the module again: the next call uses the new w, and the count keeps its device value.
  """
  directory = zoo_artifacts("cpu")["stateful_linear"]
  program = nnxc.load_program(directory, device="local-sync")
  assert [v.name for v in program.artifact.manifest.written()] == ["count"]
  x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
  new = (program.arrays()["w"] * -3 + 1).astype(np.float32)
  x.tofile(tmp_path / "x0.bin")
  new.tofile(tmp_path / "w.bin")
  same = program.arrays()["b"]
  same.tofile(tmp_path / "b.bin")
  commands = ["call", "train", tmp_path / "x", tmp_path / "before", "set", "w", tmp_path / "w.bin"]
  commands += ["set", "b", tmp_path / "b.bin", "call", "train", tmp_path / "x", tmp_path / "after"]
  run_c(c_build, directory, "--driver", "local-sync", *commands, "save", tmp_path / "saved")
  before = program.train(x)
  program.set_arrays({"w": new, "b": same})
  after = program.train(x)
  np.testing.assert_array_equal(np.fromfile(tmp_path / "before0.bin", np.float32).reshape(8, 5), before)
  np.testing.assert_array_equal(np.fromfile(tmp_path / "after0.bin", np.float32).reshape(8, 5), after)
  assert not np.array_equal(before, after)
  saved = nnxc.load_program(tmp_path / "saved").arrays()
  np.testing.assert_array_equal(saved["w"], new)
  assert int(saved["count"]) == int(program.arrays()["count"]) == 2


def test_calls_from_many_threads_are_serialized(c_build, zoo_artifacts, tmp_path):
  """The Counter model adds one per call: 4 threads x 50 calls leave exactly 200, as one thread would."""
  directory = zoo_artifacts("cpu")["counter"]
  run_c(c_build, directory, "threads", "train", tmp_path / "none", 4, 50, "save", tmp_path / "saved")
  counts = nnxc.load_program(tmp_path / "saved").arrays()
  start = nnxc.load_program(directory).arrays()
  (name,) = [n for n in counts if counts[n].dtype.kind in "iu" and counts[n].size == 1 and "count" in n]
  assert int(counts[name]) - int(start[name]) == 200


# Hostile artifacts: the C library refuses what the Python side refuses, with a code, never a crash.


def _edit_manifest(directory: pathlib.Path, edit) -> None:
  manifest = json.loads((directory / "manifest.json").read_text())
  edit(manifest)
  (directory / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _rehash(directory: pathlib.Path, relative: str) -> None:
  digest = hashlib.sha256((directory / relative).read_bytes()).hexdigest()
  _edit_manifest(directory, lambda m: m["files"].__setitem__(relative, digest))


def _flip_byte(directory, relative, offset=-100):
  data = bytearray((directory / relative).read_bytes())
  data[offset] ^= 0xFF
  (directory / relative).write_bytes(bytes(data))


def _swap_state(m):
  m["state"][0], m["state"][1] = m["state"][1], m["state"][0]


def _retype_variable(m):
  m["state"][0]["variable_type"] = "BatchStat"


def _permute_outputs(m):
  m["functions"]["predict"]["inputs"][0]["name"] = "renamed"


def _symlink_module(d):
  (d / "module.copy").write_bytes((d / "module.vmfb").read_bytes())
  (d / "module.vmfb").unlink()
  (d / "module.vmfb").symlink_to(d / "module.copy")


def _fifo_params(d):
  (d / "params.irpa").unlink()
  os.mkfifo(d / "params.irpa")


def _transplant_params(d, other):
  shutil.copyfile(other / "params.irpa", d / "params.irpa")
  _rehash(d, "params.irpa")


def _transplant_module(d, other):
  shutil.copyfile(other / "module.vmfb", d / "module.vmfb")
  _rehash(d, "module.vmfb")


def _deep_nesting(d):
  (d / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)


def _duplicate_key(d):
  text = (d / "manifest.json").read_text()
  (d / "manifest.json").write_text(text.replace('"format": ', '"model": "x", "format": ', 1))


HOSTILE = {
  "module byte flipped": (lambda d, o: _flip_byte(d, "module.vmfb"), "NNX_ERROR_ARTIFACT"),
  "params byte flipped": (lambda d, o: _flip_byte(d, "params.irpa"), "NNX_ERROR_ARTIFACT"),
  "params missing": (lambda d, o: (d / "params.irpa").unlink(), "NNX_ERROR_ARTIFACT"),
  "module a symbolic link": (lambda d, o: _symlink_module(d), "NNX_ERROR_ARTIFACT"),
  "params a FIFO": (lambda d, o: _fifo_params(d), "NNX_ERROR_ARTIFACT"),
  "state entries swapped": (lambda d, o: _edit_manifest(d, _swap_state), "NNX_ERROR_ARTIFACT"),
  "variable type edited": (lambda d, o: _edit_manifest(d, _retype_variable), "NNX_ERROR_ARTIFACT"),
  "input renamed": (lambda d, o: _edit_manifest(d, _permute_outputs), "NNX_ERROR_ARTIFACT"),
  "params of another export": (_transplant_params, "NNX_ERROR_ARTIFACT"),
  "module of another export": (_transplant_module, "NNX_ERROR_ARTIFACT"),
  "file outside the artifact": (
    lambda d, o: _edit_manifest(d, lambda m: m["files"].__setitem__("../etc/passwd", "0" * 64)),
    "NNX_ERROR_ARTIFACT",
  ),
  "unknown field": (lambda d, o: _edit_manifest(d, lambda m: m.__setitem__("run_me", "now")), "NNX_ERROR_ARTIFACT"),
  "manifest truncated": (
    lambda d, o: (d / "manifest.json").write_bytes((d / "manifest.json").read_bytes()[:500]),
    "NNX_ERROR_ARTIFACT",
  ),
  "manifest nested 100000 deep": (lambda d, o: _deep_nesting(d), "NNX_ERROR_ARTIFACT"),
  "manifest key twice": (lambda d, o: _duplicate_key(d), "NNX_ERROR_ARTIFACT"),
  "another compiler release": (
    lambda d, o: _edit_manifest(d, lambda m: m["versions"].__setitem__("iree-base-compiler", "3.99.0")),
    "NNX_ERROR_VERSION",
  ),
  "another format version": (
    lambda d, o: _edit_manifest(d, lambda m: m.__setitem__("format_version", 2)),
    "NNX_ERROR_VERSION",
  ),
}


@pytest.fixture(scope="session")
def other_export(tmp_path_factory):
  """Another program (a different model) for the cpu target: the source of transplanted files."""
  path = tmp_path_factory.mktemp("other") / "linear"
  entry = ZOO["linear"]
  nnxc.export(entry.make(0), {"predict": nnxc.method("__call__", *entry.example_args(8, 0))}, target="cpu").save(path)
  return path


@pytest.mark.parametrize("family", list(HOSTILE))
def test_hostile_artifact_gets_an_error_code_as_python_refuses_it(
  c_build, adamw_artifacts, other_export, family, tmp_path
):
  edit, code = HOSTILE[family]
  directory = tmp_path / "artifact"
  shutil.copytree(adamw_artifacts("cpu"), directory)
  edit(directory, other_export)
  with pytest.raises(nnxc.NnxMetalError):
    nnxc.load_program(directory)
  result = run_c(c_build, directory, "info", check=False)
  assert code in result.stderr, result.stderr
  assert result.returncode == 10 + [
    "NNX_OK",
    "NNX_ERROR_ARGUMENT",
    "NNX_ERROR_IO",
    "NNX_ERROR_ARTIFACT",
    "NNX_ERROR_DIGEST",
    "NNX_ERROR_VERSION",
  ].index(code)


def test_a_pinned_digest_refuses_any_other_artifact(c_build, adamw_artifacts, other_export):
  directory = adamw_artifacts("cpu")
  digest = nnxc.Artifact.open(directory).digest
  assert f"digest {digest}" in run_c(c_build, directory, "--digest", digest, "info").stdout
  other = run_c(c_build, other_export, "--digest", digest, "info", check=False)
  assert other.returncode == 10 + 4 and "NNX_ERROR_DIGEST" in other.stderr


def test_the_metal_stand_in_refuses_a_lavapipe_of_another_width(c_build, adamw_artifacts):
  require_device("metal-vulkan")
  directory = adamw_artifacts("metal-vulkan")
  env = {**os.environ, "LP_NATIVE_VECTOR_WIDTH": "256", "MESA_SHADER_CACHE_DISABLE": "true"}  # not the 512-bit cache
  result = subprocess.run([str(c_build["nnx_run"]), str(directory), "info"], capture_output=True, text=True, env=env)
  assert result.returncode == 10 + 6 and "LP_NATIVE_VECTOR_WIDTH=512" in result.stderr, result.stderr


def test_version_skew_message_names_the_compiler_and_runtime_to_use(c_build, adamw_artifacts, tmp_path):
  directory = tmp_path / "artifact"
  shutil.copytree(adamw_artifacts("cpu"), directory)
  _edit_manifest(directory, lambda m: m["versions"].__setitem__("iree-base-compiler", "3.99.0"))
  message = run_c(c_build, directory, "info", check=False).stderr
  assert "iree-base-compiler 3.99.0" in message and "3.13" in message and deploy.IREE_COMMIT in message
  header = (deploy.LIBRARY / "nnx_metal.h").read_text()
  from compile.runtime._file_names import FORMAT_VERSION

  assert f"#define NNX_METAL_FORMAT_VERSION {FORMAT_VERSION}\n" in header
  assert f'#define NNX_METAL_IREE_RUNTIME_COMMIT "{deploy.IREE_COMMIT}"' in header
  compiler = nnxc.Artifact.open(adamw_artifacts("cpu")).manifest.versions["iree-base-compiler"]
  assert compiler.startswith(header.split('NNX_METAL_IREE_COMPILER_RELEASE "')[1].split('"')[0] + ".")


@pytest.mark.after_compiles
def test_every_model_of_nox_metal_built_for_cpu_loads_in_c(c_build, tmp_path):
  """`nox -s metal`'s build, for the cpu target instead: the C library opens every artifact and lists it as Python."""
  out = tmp_path / "cpu"
  result = subprocess.run(
    [sys.executable, "-m", "nnx_models.tools.build_zoo", "--target", "cpu", "--out", str(out)],
    capture_output=True,
    text=True,
    timeout=1800,
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  directories = sorted(p for p in out.iterdir() if (p / "manifest.json").exists())
  assert len(directories) > len(ZOO)
  for directory in directories:
    listing = run_c(c_build, directory, "info").stdout
    opened = nnxc.Artifact.open(directory)  # as Python sees it
    for name in opened.functions:
      assert f"function {name} inputs" in listing, directory.name
    assert listing.count("\nstate ") == len(opened.state), directory.name


# The parser and hash the library's checks rest on; the binary an app links.


def test_sha256_matches_hashlib(c_build, tmp_path):
  rng = np.random.default_rng(0)
  sizes = [0, 1, 55, 56, 57, 63, 64, 65, 119, 120, 128, 1000, 1 << 20]
  paths = []
  for size in sizes:
    paths.append(tmp_path / f"{size}.bin")
    paths[-1].write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
  result = subprocess.run([str(c_build["fuzz_json"]), "sha256", *map(str, paths)], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def _python_accepts(document: bytes) -> bool:
  """What the C reader must accept: Python's json, minus what it refuses on purpose (see nnx_json.h)."""

  def unique(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
      raise ValueError("duplicate key")
    return dict(pairs)

  def no_constants(name):
    raise ValueError(name)

  def check(value, level=0):
    """Nesting at most 128 deep; no NUL and no lone surrogate in any string or key."""
    if level > 128:
      raise ValueError("deep")
    strings = [value] if isinstance(value, str) else list(value) if isinstance(value, dict) else []
    for text in strings:
      if "\x00" in text:
        raise ValueError("NUL")
      text.encode("utf-8")  # a lone surrogate from a \\ud800 escape raises
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for child in children:
      check(child, level + 1)

  try:
    check(json.loads(document.decode("utf-8"), object_pairs_hook=unique, parse_constant=no_constants))
    return True
  except (ValueError, RecursionError, UnicodeError):
    return False


def test_json_reader_accepts_exactly_what_python_accepts(c_build, adamw_artifacts, tmp_path):
  manifest = (adamw_artifacts("cpu") / "manifest.json").read_bytes()
  handmade = [
    b"{}",
    b"[]",
    b"0",
    b"-0.5e+3",
    b'"\\u00e9\\ud83d\\ude00"',
    b'"\\ud800"',
    b'"\\udc00x"',
    b'"a\\u0000b"',
    b"01",
    b"1.",
    b".5",
    b"NaN",
    b"Infinity",
    b"[1,]",
    b'{"a":1,"a":2}',
    b'{"a":1,"b":{"a":2}}',
    b'"\xc3\xa9"',
    b'"\xc0\x80"',
    b'"\xed\xa0\x80"',
    b'"\t"',
    b"[" * 128 + b"]" * 128,
    b"[" * 130 + b"]" * 130,
    b" \n\t\r[true,false,null] ",
    b"[1] x",
    b"",
    b'{"a" 1}',
    b"\xef\xbb\xbf{}",
  ]
  rng = np.random.default_rng(1)
  mutants = []
  for _ in range(1500):
    data = bytearray(manifest[: int(rng.integers(1, 3000))] if rng.random() < 0.3 else manifest)
    for _ in range(int(rng.integers(1, 4))):
      at = int(rng.integers(0, len(data)))
      data[at : at + 1] = bytes([int(rng.choice(list(b'{}[]",:\\0123456789aeu-. ')))])
    mutants.append(bytes(data))
  documents = handmade + mutants
  (tmp_path / "documents.hex").write_text("\n".join(d.hex() for d in documents) + "\n")
  result = subprocess.run(
    [str(c_build["fuzz_json"]), "accepts", str(tmp_path / "documents.hex")], capture_output=True, text=True
  )
  assert result.returncode == 0, result.stderr[-3000:]
  got = [line == "1" for line in result.stdout.split()]
  want = [_python_accepts(d) for d in documents]
  differ = [documents[i][:120] for i in range(len(documents)) if got[i] != want[i]]
  assert not differ, differ[:5]
  assert sum(want) > 20  # the mutants are not all rejected


def test_json_reader_survives_mutated_manifests_under_sanitizers(c_build, adamw_artifacts):
  """ASan and UBSan abort on any out-of-bounds read, leak-free use after free, overflow or invariant failure."""
  seeds = [adamw_artifacts("cpu") / "manifest.json"]
  result = subprocess.run(
    [str(c_build["fuzz_json"]), "mutate", "20261207", "30000", *map(str, seeds)],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith("mutants 30000 parsed ")


def test_the_c_programs_do_not_link_python(c_build):
  ldd = shutil.which("ldd")
  if ldd is None:
    skip_or_fail(REQUIREMENT, "ldd is not installed")
  libraries = subprocess.run([ldd, str(c_build["nnx_run"])], capture_output=True, text=True, check=True).stdout
  assert "libc" in libraries and "python" not in libraries.lower()
  assert b"Py_Initialize" not in c_build["nnx_run"].read_bytes()


# `nnx-metal deploy`.


def test_deploy_writes_a_project_that_builds_and_runs_from_a_clean_directory(c_build, adamw_artifacts, tmp_path):
  directory = adamw_artifacts("cpu")
  project = tmp_path / "project"
  result = subprocess.run(
    [sys.executable, "-m", "compile.cli", "deploy", str(directory), "--out", str(project), "--name", "mlp"],
    capture_output=True,
    text=True,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  header = (project / "mlp.h").read_text()
  assert "nnx_code_t mlp_predict(nnx_program_t *program, const float args_0[8][2], float outputs[8][5]" in header
  train_step = "nnx_code_t mlp_train_step(nnx_program_t *program, const float args_0[8][2], const float args_1[8][5], "
  assert train_step in header
  # One job: a clean build of IREE's runtime beside the other worker's tests, leaving lavapipe a core (see c_build.py).
  build = deploy.build(project, tmp_path / "build", iree_source=c_build["source"], targets=("mlp_demo",), jobs=1)
  demo = subprocess.run([str(build / "mlp_demo"), str(project / "artifact")], capture_output=True, text=True)
  assert demo.returncode == 0, demo.stderr
  program = nnxc.load_program(directory)
  printed = {}
  for line in demo.stdout.splitlines():
    function, _, *values = line.split(" ")
    printed[function] = np.array([float(v) for v in values], np.float32)
  for name, spec in program.functions.items():
    inputs = [(np.arange(t.size) % 7 * 0.25 - 0.5).astype(t.dtype).reshape(t.shape) for t in spec.spec.inputs]
    want = np.asarray(spec(*inputs), np.float32).ravel()
    np.testing.assert_array_equal(printed[name], want, err_msg=name)
