"""Artifacts: saved atomically, verified on load, loadable without JAX, runnable with IREE's own tools."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import compile as nnxc
from compile.runtime import _artifact, open_device
from compile.runtime._file_names import FORMAT_VERSION
from nnx_models import ZOO
from tests.conftest import assert_trees_allclose, require_device

BATCH = 4
# iree-base-runtime's iree-run-module, through the package: found in any environment, activated or not.
IREE_RUN_MODULE = [sys.executable, "-m", "iree._runtime.scripts.iree_run_module"]


def _mlp_artifact(target: str = "cpu", cache=True) -> nnxc.Artifact:
  args = ZOO["mlp"].example_args(BATCH, 0)
  functions = {mode: nnxc.method("__call__", *args, mode=mode) for mode in ("train", "eval")}
  return nnxc.export(ZOO["mlp"].make(0), functions, target=target, cache=cache)


@pytest.fixture
def saved(tmp_path):
  directory = tmp_path / "mlp"
  program = _mlp_artifact().load()
  program.train(*ZOO["mlp"].example_args(BATCH, 1))  # so the saved state is not the initial one
  program.save(directory)
  return directory, program


def test_artifact_directory_holds_what_the_manifest_says(saved):
  directory, program = saved
  names = {p.name for p in directory.iterdir()}
  assert {"manifest.json", "module.vmfb", "params.irpa", "module.mlir"} <= names
  manifest = json.loads((directory / "manifest.json").read_text())
  assert manifest["format_version"] == FORMAT_VERSION
  assert manifest["model"] == "nnx_models._mlp:MLP"
  assert set(manifest["files"]) == {"module.vmfb", "params.irpa", "module.mlir"}
  assert manifest["target"]["name"] == "cpu" and "--iree-hal-target-device=local" in manifest["flags"]
  assert set(manifest["versions"]) == {"jax", "flax", "iree-base-compiler", "nnx-metal"}
  by_name = {entry["name"]: entry for entry in manifest["state"]}
  assert by_name["bn.mean"]["variable_type"] == "BatchStat" and by_name["bn.mean"]["shape"] == [16]
  assert by_name["dropout.rngs.key"]["key_impl"] == "threefry2x32"
  assert manifest["functions"]["eval"]["inputs"] == [
    {"name": "args[0]", "shape": [4, 2], "dtype": "float32", "device_dtype": "float32"}
  ]
  assert manifest["functions"]["train"]["dispatch_count"] > manifest["functions"]["eval"]["dispatch_count"] >= 1
  assert len(manifest["graphdef_fingerprint"]) == 64


def test_dispatch_count_counts_each_iteration_of_a_loop_with_static_bounds():
  """A layer applied n times in nnx.fori_loop launches its kernels n times a call: the count grows with n."""
  model = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
  x = jnp.ones((2, 4))

  def repeated(times):
    def apply(model, x):
      return nnx.fori_loop(0, times, lambda i, carry: jnp.tanh(model(carry)), x)

    return nnxc.export(model, {"f": nnxc.function(apply, x)}).functions["f"].dispatch_count

  three, five, seven = repeated(3), repeated(5), repeated(7)
  assert seven - five == five - three > 0, (three, five, seven)


def test_saved_artifact_reloads_with_its_trained_state(saved):
  directory, program = saved
  reloaded = nnxc.load_program(directory)
  assert_trees_allclose(reloaded.state(), program.state(), rtol=0, atol=0)
  x = ZOO["mlp"].example_args(BATCH, 2)[0]
  np.testing.assert_array_equal(reloaded.eval(x), program.eval(x))
  model = ZOO["mlp"].make(0)
  reloaded.update(model)
  model.eval()
  np.testing.assert_allclose(model(x), program.eval(x), rtol=2e-5, atol=2e-5)


def test_programs_on_one_driver_share_its_device():
  """Every load on a driver reuses the process's device (compile/runtime/_device.py), until it is lost."""
  assert open_device("local-sync") is open_device("local-sync")
  assert open_device("local-sync") is not open_device("local-task")


@pytest.mark.parametrize("driver", ["local-sync", "local-task"])
def test_an_opened_artifact_lends_its_parameters_to_programs_that_never_write_them(saved, driver):
  """Opened parameters lie in aligned, read-only memory, which a cpu device uses in place for the constants;
  what a program writes goes to its own copy: the artifact's values stay, and every load starts from them."""
  directory, _ = saved
  artifact = nnxc.Artifact.open(directory)
  assert all(a.ctypes.data % 64 == 0 and not a.flags.writeable for a in artifact.params.values() if a.size)
  before = {name: a.copy() for name, a in artifact.params.items()}
  first = artifact.load(device=driver)
  for step in range(3):
    first.train(*ZOO["mlp"].example_args(BATCH, step))
  trained = first.arrays()
  assert any(not np.array_equal(trained[v.name], before[v.global_name]) for v in artifact.state)
  for name, a in artifact.params.items():
    np.testing.assert_array_equal(a, before[name], err_msg=name)
  second = artifact.load(device=driver)
  assert_trees_allclose(second.state(), artifact.saved_state(), rtol=0, atol=0)


def test_metal_artifact_carries_the_msl_of_every_dispatch(tmp_path):
  artifact = _mlp_artifact("metal")
  artifact.save(tmp_path / "metal")
  manifest = json.loads((tmp_path / "metal" / "manifest.json").read_text())
  msl = sorted(p.name for p in (tmp_path / "metal" / "msl").iterdir())
  assert msl == sorted(f"{name}.metal" for name in manifest["dispatches"])
  for function in manifest["functions"].values():
    assert set(function["executables"]) <= set(manifest["dispatches"])
  assert all(f"msl/{name}" in manifest["files"] for name in msl)
  assert "kernel void" in (tmp_path / "metal" / "msl" / msl[0]).read_text()


def test_loading_needs_neither_jax_nor_flax(saved, tmp_path):
  directory, program = saved
  x = np.asarray(ZOO["mlp"].example_args(BATCH, 3)[0])
  np.save(tmp_path / "x.npy", x)
  script = textwrap.dedent(
    f"""
    import sys
    sys.modules["jax"] = sys.modules["flax"] = None  # importing either now fails
    import numpy as np
    import compile
    program = compile.load_program({str(directory)!r})
    np.save({str(tmp_path / "y.npy")!r}, program.eval(np.load({str(tmp_path / "x.npy")!r})))
    count = program.arrays(["dropout.rngs.count"])["dropout.rngs.count"]
    assert count.dtype == np.uint32 and int(count) == 1, count
    try:
      import jax
    except ImportError:
      print("no jax")
    """
  )
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=os.getcwd())
  assert result.returncode == 0, result.stderr
  assert "no jax" in result.stdout
  np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), program.eval(x))


def test_iree_run_module_runs_the_artifact_with_its_parameter_archive(saved, tmp_path):
  directory, program = saved
  x = np.asarray(ZOO["mlp"].example_args(BATCH, 4)[0])
  np.save(tmp_path / "x.npy", x)
  command = [
    *IREE_RUN_MODULE,
    "--device=local-sync",
    f"--module={directory / 'module.vmfb'}",
    f"--parameters=model={directory / 'params.irpa'}",
    "--function=eval",
    f"--input=@{tmp_path / 'x.npy'}",
    f"--output=@{tmp_path / 'y.npy'}",
  ]
  result = subprocess.run(command, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), program.eval(x))


def _flip_a_byte(path):
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF
  path.write_bytes(bytes(data))


@pytest.mark.parametrize(
  "damage, message",
  [
    (lambda d: _flip_a_byte(d / "params.irpa"), r"params\.irpa is corrupt or was changed"),
    (
      lambda d: (d / "module.vmfb").write_bytes((d / "module.vmfb").read_bytes()[:100]),
      r"module\.vmfb is corrupt or was changed",
    ),
    (lambda d: (d / "module.mlir").unlink(), r"module\.mlir is missing"),
    (lambda d: (d / "manifest.json").unlink(), "has no manifest.json"),
    (lambda d: (d / "manifest.json").write_text("{"), "not valid JSON"),
  ],
)
def test_damaged_artifacts_are_refused(saved, damage, message):
  directory, _ = saved
  damage(directory)
  with pytest.raises(nnxc.ArtifactError, match=message):
    nnxc.load_program(directory)


def _edit_manifest(directory, edit):
  manifest = json.loads((directory / "manifest.json").read_text())
  edit(manifest)
  (directory / "manifest.json").write_text(json.dumps(manifest))


def test_mismatched_artifacts_are_refused(saved):
  directory, _ = saved
  _edit_manifest(directory, lambda m: m["versions"].update({"iree-base-compiler": "2.9.0"}))
  with pytest.raises(nnxc.ArtifactError, match=r"compiled by iree-base-compiler 2\.9\.0.*iree-base-runtime==2\.9\.0"):
    nnxc.load_program(directory)
  _edit_manifest(directory, lambda m: m.update({"format_version": 99}))
  with pytest.raises(nnxc.ArtifactError, match="format version 99"):
    nnxc.load_program(directory)


def test_a_params_archive_from_another_export_is_refused(saved, tmp_path):
  directory, _ = saved
  other = tmp_path / "linear"
  args = ZOO["linear"].example_args(BATCH, 0)
  nnxc.export(ZOO["linear"].make(0), {"f": nnxc.method("__call__", *args)}).save(other)
  shutil.copy(other / "params.irpa", directory / "params.irpa")
  _edit_manifest(
    directory, lambda m: m["files"].update({"params.irpa": _artifact.sha256((other / "params.irpa").read_bytes())})
  )
  with pytest.raises(nnxc.ArtifactError, match="belongs to another export"):
    nnxc.load_program(directory)


def test_an_interrupted_save_leaves_the_previous_artifact_whole(saved, monkeypatch):
  directory, program = saved
  before = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}

  def fail(*args, **kwargs):
    raise KeyboardInterrupt  # the user pressed ^C half-way through writing

  monkeypatch.setattr(_artifact, "write_params", fail)
  with pytest.raises(KeyboardInterrupt):
    program.save(directory)
  after = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
  assert after == before
  assert [p.name for p in directory.parent.iterdir() if p.name.startswith(".")] == []
  nnxc.load_program(directory)


def test_the_state_of_a_loaded_artifact_merges_into_a_fresh_model(saved):
  directory, program = saved
  model = ZOO["mlp"].make(0)
  nnx.update(model, nnxc.load_program(directory).state(nnx.BatchStat))
  assert_trees_allclose(nnx.state(model, nnx.BatchStat), program.state(nnx.BatchStat), rtol=0, atol=0)


def test_builds_are_byte_reproducible_across_processes(tmp_path):
  """The same model and functions give the same module.vmfb and params.irpa bytes, from any process or caller."""
  script = textwrap.dedent(
    f"""
    import sys
    import compile as nnxc
    from nnx_models import ZOO
    args = ZOO["mlp"].example_args({BATCH}, 0)
    functions = {{m: nnxc.method("__call__", *args, mode=m) for m in ("train", "eval")}}
    nnxc.export(ZOO["mlp"].make(0), functions, target=sys.argv[1], cache=False).save(sys.argv[2])
    """
  )
  for target in ("cpu", "metal"):
    outputs = [tmp_path / f"{target}{i}" for i in range(2)]
    for out in outputs:
      result = subprocess.run([sys.executable, "-c", script, target, str(out)], capture_output=True, text=True)
      assert result.returncode == 0, result.stderr
    for name in ("module.vmfb", "params.irpa", "module.mlir", "manifest.json"):  # the manifest holds no timing
      first, second = ((out / name).read_bytes() for out in outputs)
      assert first == second, f"{target}/{name} differs between two builds"
    assert len({nnxc.Artifact.open(out).digest for out in outputs}) == 1


def test_save_replaces_an_artifact_but_never_anything_else(saved, tmp_path):
  directory, program = saved
  program.save(directory)  # a previous artifact: replaced
  project = tmp_path / "project"
  (project / "src").mkdir(parents=True)
  (project / "src" / "model.py").write_text("precious")
  with pytest.raises(nnxc.ArtifactError, match="exists and is not an nnx-metal artifact; nothing was written"):
    program.save(project)
  assert (project / "src" / "model.py").read_text() == "precious"
  a_file = tmp_path / "notes.txt"
  a_file.write_text("precious")
  with pytest.raises(nnxc.ArtifactError, match="not an nnx-metal artifact"):
    program.save(a_file)
  assert a_file.read_text() == "precious"
  program.save(a_file, overwrite=True)  # explicitly asked for
  nnxc.load_program(a_file)
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_the_runtime_imports_no_jax():
  script = "import sys\nimport compile.runtime, compile\nassert not {'jax', 'flax', 'jaxlib'} & set(sys.modules)"
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("target", ["cpu", "metal-vulkan"])
def test_16_bit_float_state_round_trips_through_the_parameter_archive(dtype, target, tmp_path):
  require_device(target)
  model = nnx.Linear(4, 3, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
  x = np.linspace(-1, 1, 8).reshape(2, 4).astype(jnp.dtype(dtype))
  program = nnxc.export(model, {"f": nnxc.method("__call__", x)}, target=target).load()
  program.set_arrays({"bias": np.full(3, 0.3, jnp.dtype(dtype))})  # a value only 16-bit rounding gives
  program.save(tmp_path / "a")
  reloaded = nnxc.load_program(tmp_path / "a")
  assert reloaded.artifact.manifest.state[0].dtype == dtype
  assert_trees_allclose(reloaded.state(), program.state(), rtol=0, atol=0)
  assert reloaded.state()["bias"].get_value().dtype == jnp.dtype(dtype)
  np.testing.assert_array_equal(reloaded.f(x).astype(np.float32), program.f(x).astype(np.float32))


def test_bfloat16_bit_manipulation_is_refused_on_spirv_naming_op_and_line():
  class Bits(nnx.Module):
    def __call__(self, x):
      return jax.lax.bitcast_convert_type(x, jnp.uint16)

  x = np.zeros((4,), jnp.bfloat16)
  with pytest.raises(
    nnxc.UnsupportedOpError, match=r"bitcast_convert` at .*test_artifacts\.py:\d+:\d+ reads or writes"
  ):
    nnxc.export(Bits(), {"f": nnxc.method("__call__", x)}, target="metal")
  assert nnxc.export(Bits(), {"f": nnxc.method("__call__", x)}, target="cpu").load().f(x).dtype == np.uint16


def test_a_state_keyed_by_a_tuple_path_saves_and_opens(tmp_path):
  """flax's SpectralNorm keys its statistics by the parameter's path: ('batch_stats', ('kernel', 'sigma'))."""
  from nnx_models import CATALOG
  from nnx_models.tools.build_zoo import catalog_functions

  entry = CATALOG["spectral_norm"]
  objects = entry.objects()
  with jax.numpy_dtype_promotion("standard"):
    artifact = nnxc.export(objects, catalog_functions(entry), target="cpu")
  artifact.save(tmp_path / "spectral")
  opened = nnxc.Artifact.open(tmp_path / "spectral")
  paths = [path for path, _ in nnx.to_flat_state(nnx.state(objects))]
  assert [v.path for v in opened.state] == paths
  assert any(isinstance(part, tuple) for path in paths for part in path)  # the case this test is about
  assert_trees_allclose(opened.load().state(), nnx.state(objects), rtol=0, atol=0)
