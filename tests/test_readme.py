"""The README's Python example runs as written."""

import pathlib
import re

import jax

README = pathlib.Path(__file__).parent.parent / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  assert blocks, "README.md has no python example"
  monkeypatch.chdir(tmp_path)  # it saves into build/
  namespace = {}
  exec(compile_source(blocks[0]), namespace)
  assert (tmp_path / "build" / "my_mlp" / "module.vmfb").exists()
  assert (tmp_path / "build" / "my_mlp" / "spirv").is_dir()
  assert namespace["y"].shape == (8, 5) and namespace["outputs"].shape == (8, 5)
  assert int(namespace["model"].dropout.rngs.count.get_value()) == 1  # the train call, merged back


def test_readme_program_example_runs(tmp_path, monkeypatch):
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  monkeypatch.chdir(tmp_path)
  namespace = {}
  with jax.numpy_dtype_promotion("standard"):  # as users run it; optax's adam mixes floats and int counts
    exec(compile_source(blocks[1]), namespace)
  losses = namespace["losses"]
  assert losses[-1] < losses[0]
  assert namespace["prediction"].shape == (8, 5)
  assert int(namespace["optimizer"].step.get_value()) == 10  # merged back
  assert (tmp_path / "build" / "mlp_program" / "params.irpa").exists()


def compile_source(source: str):
  return compile(source, str(README), "exec")  # the builtin, not our package
