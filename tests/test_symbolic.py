"""Functions exported for any batch size (issue 17, finding 4): symbolic dimensions against eager NNX."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import compile as nnxc
from compile import call_with_objects, cli
from compile.runtime import path_name
from nnx_models import CATALOG
from tests.conftest import assert_trees_allclose, require_device

MAX_BATCH = 16
BATCHES = (1, 3, 8)
# The catalog's forward models: every entry but the train steps (their batch is the optimizer's business too)
# and the decode cache, whose batch is part of the state (a cache is allocated for one batch size).
FORWARD = [name for name, entry in CATALOG.items() if not name.startswith("adamw_") and name != "attention_decode"]
# What IREE 3.13 cannot compile with a dynamic batch (measured; these export one function per batch size, buckets):
# convolutions with groups, pooling windows, the reshapes of Flax's normalizations, attention masks, scans.
NEEDS_BUCKETS = {
  "conv_depthwise", "conv_grouped", "max_pool", "layer_norm", "instance_norm", "rms_norm", "group_norm", "embed",
  "attention_causal", "attention_padding_mask", "lstm", "gru", "simple_cell", "optimized_lstm", "bidirectional",
  "einsum", "linear_general", "transformer_block",
}  # fmt: skip
# ... and what its SPIR-V code generation cannot ("dynamic dimensions must have been resolved"), on top.
NEEDS_BUCKETS_ON_SPIRV = {"avg_pool", "batch_norm", "resnet_block", "mlp_bfloat16"}


def _batch_dim():
  (batch,) = jax.export.symbolic_shape("b", constraints=(f"b <= {MAX_BATCH}",))
  return batch


def _symbolic(example: tuple) -> tuple:
  batch = _batch_dim()
  return tuple(jax.ShapeDtypeStruct((batch, *np.shape(x)[1:]), np.asarray(x).dtype) for x in example)


def _batch_of(example: tuple, batch: int) -> tuple:
  """The example inputs grown or cut to ``batch`` rows; float rows made different from each other."""
  inputs = []
  for x in map(np.asarray, example):
    rows = np.concatenate([x] * (batch // len(x) + 1))[:batch]
    if np.issubdtype(rows.dtype, np.floating):
      offset = np.arange(batch).reshape(-1, *[1] * (rows.ndim - 1)) * 0.125
      rows = (rows.astype(np.float32) + offset).astype(rows.dtype)
    inputs.append(rows)
  return tuple(inputs)


def _buckets(name: str, target: str) -> tuple[int, ...]:
  spirv = target != "cpu"
  return BATCHES if name in NEEDS_BUCKETS or (spirv and name in NEEDS_BUCKETS_ON_SPIRV) else ()


@functools.cache
def _artifact(name: str, target: str) -> nnxc.Artifact:
  entry, buckets = CATALOG[name], _buckets(name, target)
  functions = {
    fn: nnxc.function(call, *_symbolic(entry.inputs(fn, 0)), buckets=buckets) for fn, call in entry.calls.items()
  }
  with jax.numpy_dtype_promotion("standard"):
    return nnxc.export(entry.objects(), functions, target=target)


# Every forward model of the catalog on cpu and on the stand-in: a symbolic batch where IREE compiles one,
# buckets where it cannot (static functions the Program chooses from by the input's size).
CASES = [(name, target) for target in ("cpu", "metal-vulkan") for name in FORWARD]


@pytest.mark.parametrize(("name", "target"), CASES)
@pytest.mark.usefixtures("standard_dtype_promotion")
def test_symbolic_batch_matches_eager_at_three_batch_sizes(name, target):
  require_device(target)
  entry = CATALOG[name]
  program, eager = _artifact(name, target).load(), entry.objects()
  tolerance = dict(rtol=entry.rtol, atol=entry.rtol)
  for step, batch in enumerate(BATCHES):
    for function, fn in entry.calls.items():
      inputs = _batch_of(entry.inputs(function, step), batch)
      got = getattr(program, function)(*inputs)  # a bucketed function is a group of program functions
      want = call_with_objects(eager, fn, tuple(jnp.asarray(x) for x in inputs))
      assert_trees_allclose(got, jax.tree.map(np.asarray, want), **tolerance)
    compiled = {path_name(p): v for p, v in nnx.to_flat_state(program.state())}
    for path, variable in nnx.to_flat_state(nnx.state(eager)):
      assert_trees_allclose({path_name(path): compiled[path_name(path)]}, {path_name(path): variable}, **tolerance)


def test_a_batch_outside_the_declared_bounds_is_refused_naming_the_dimension():
  program = _artifact("lora", "cpu").load()
  (x,) = _batch_of(CATALOG["lora"].inputs("eval", 0), MAX_BATCH + 1)
  with pytest.raises(nnxc.SignatureError, match=rf"dimension b = {MAX_BATCH + 1} is outside its declared bounds"):
    program.eval(x)
  assert program.artifact.functions["eval"].inputs[0].shape[0] == nnxc.runtime.Dim("b", 1, MAX_BATCH)
  assert "float32[b, 6]" in program.eval.signature()


def test_a_dimension_iree_cannot_compile_says_to_use_buckets():
  entry = CATALOG["layer_norm"]
  with pytest.raises(nnxc.CompileError, match=r"buckets=\(1, 8, 32\)"):
    nnxc.export(entry.objects(), {"eval": nnxc.function(entry.calls["eval"], *_symbolic(entry.inputs("eval", 0)))})


def test_buckets_pick_the_size_and_pad_only_where_asked():
  entry = CATALOG["layer_norm"]
  example = _symbolic(entry.inputs("eval", 0))
  functions = {
    "eval": nnxc.function(entry.calls["eval"], *example, buckets=(1, 4, 8), pad=True),
    "train": nnxc.function(entry.calls["train"], *example, buckets=(1, 4, 8)),
  }
  program, eager = nnxc.export(entry.objects(), functions).load(), entry.objects()
  assert sorted(program.functions) == ["eval__pad1", "eval__pad4", "eval__pad8", "train__b1", "train__b4", "train__b8"]
  for batch in (1, 3, 6):  # 3 and 6 run padded to 4 and 8
    (x,) = _batch_of(entry.inputs("eval", 0), batch)
    assert_trees_allclose(program.eval(x), np.asarray(entry.calls["eval"](eager, jnp.asarray(x))), rtol=2e-5, atol=2e-5)
  with pytest.raises(nnxc.SignatureError, match=r"train was exported for the sizes \[1, 4, 8\]; this call has size 3"):
    program.train(_batch_of(entry.inputs("train", 0), 3)[0])
  with pytest.raises(nnxc.SignatureError, match=r"eval was exported for any size up to 8; this call has size 9"):
    program.eval(_batch_of(entry.inputs("eval", 0), 9)[0])


def test_the_cli_and_functional_take_bucketed_and_symbolic_functions(tmp_path):
  """`nnx-metal run --function eval` and `program.functional("eval")` on buckets (layer_norm) and a symbolic batch."""
  bucketed = {
    "eval": nnxc.function(
      CATALOG["layer_norm"].calls["eval"],
      *_symbolic(CATALOG["layer_norm"].inputs("eval", 0)),
      buckets=(1, 4, 8),
      pad=True,
    )
  }
  nnxc.export(CATALOG["layer_norm"].objects(), bucketed).save(tmp_path / "layer_norm")
  _artifact("lora", "cpu").save(tmp_path / "lora")
  for name in ("layer_norm", "lora"):
    entry, directory = CATALOG[name], tmp_path / name
    (x,) = _batch_of(entry.inputs("eval", 0), 3)  # layer_norm: padded into the bucket of 4
    np.save(tmp_path / "x.npy", x)
    argv = ["run", str(directory), "--function", "eval", "--input", f"@{tmp_path / 'x.npy'}"]
    assert cli.main([*argv, "--output", str(tmp_path / "y.npy")]) == 0
    program = nnxc.load_program(directory)
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), program.eval(x))
    outputs, state = program.functional("eval")(nnx.state(entry.objects()), x)
    eager = entry.objects()
    assert_trees_allclose(outputs, np.asarray(entry.calls["eval"](eager, jnp.asarray(x))), rtol=2e-5, atol=2e-5)
    assert_trees_allclose(state, nnx.state(eager), rtol=2e-5, atol=2e-5)
    (wrong,) = _batch_of(entry.inputs("eval", 0), MAX_BATCH + 1)
    np.save(tmp_path / "x.npy", wrong)
    assert cli.main(argv) == 2


@pytest.mark.parametrize("name", ["conv_strided", "lora", "transformer_block"])  # dynamic, dynamic, buckets
def test_a_metal_build_with_a_symbolic_batch_passes_the_race_check(name):
  artifact = _artifact(name, "metal")
  dynamic = isinstance(next(iter(artifact.functions.values())).inputs[0].shape[0], nnxc.runtime.Dim)
  assert dynamic == (not _buckets(name, "metal"))
  assert artifact.manifest.hazard_check == "passed" and artifact.spirv()
  assert not any(nnxc.find_races(spirv) for spirv in artifact.spirv().values())


@pytest.mark.parametrize(
  ("edit", "field"),
  [
    (lambda m: m["functions"]["eval"]["inputs"][0]["shape"][0].update(dim="__import__('os')"), r"shape\[0\]\.dim"),
    (lambda m: m["functions"]["eval"]["inputs"][0]["shape"][0].update(max=0), r"shape\[0\]\.max must be"),
    (lambda m: m["functions"]["eval"]["inputs"][0]["shape"][0].update(extra=1), r"unknown field"),
    (lambda m: m["state"][0]["shape"].__setitem__(0, {"dim": "b", "min": 1, "max": 4}), r"state has no symbolic"),
  ],
)
def test_symbolic_dimensions_in_a_manifest_are_checked_strictly(edit, field, tmp_path):
  import json

  directory = tmp_path / "a"
  _artifact("lora", "cpu").save(directory)
  manifest = json.loads((directory / "manifest.json").read_text())
  edit(manifest)
  (directory / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(nnxc.ArtifactError, match=field):
    nnxc.Artifact.open(directory)


def test_the_dynamic_bench_times_every_batch_and_renders_its_table():
  from nnx_models.tools import bench_dynamic

  result = bench_dynamic.run(targets=("cpu",), batches=(1, 3), calls=2)
  assert [(row["target"], row["batch"]) for row in result["rows"]] == [("cpu", 1), ("cpu", 3)]
  assert all(row["static_ms"] > 0 and row["dynamic_ms"] > 0 and row["bucketed_ms"] > 0 for row in result["rows"])
  table = bench_dynamic.markdown(result)
  assert table[0].startswith("### Dynamic against static shapes")
  assert sum(line.startswith("| cpu |") for line in table) == 2
