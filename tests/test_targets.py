"""Every zoo model exports for Metal with MSL and valid SPIR-V per kernel; the stand-in runs Metal's code generation."""

import functools
import re
import subprocess

import numpy as np
import pytest
from flax import nnx

import compile as nnxc
from compile import _targets
from nnx_models import ZOO
from tests.conftest import TOLERANCES, assert_trees_allclose, require_device, spirv_tool

BATCH = 4


def _functions(name: str) -> dict:
  args = ZOO[name].example_args(BATCH, 0)
  return {mode: nnxc.method("__call__", *args, mode=mode) for mode in ("train", "eval")}


@functools.cache
def _artifact(name: str, target: str = "metal", platform: str = "macos") -> nnxc.Artifact:
  return nnxc.export(ZOO[name].make(0), _functions(name), target=target, metal_platform=platform)


@pytest.mark.parametrize("name", list(ZOO))
def test_metal_export_has_msl_and_spirv_for_every_kernel(name):
  artifact = _artifact(name)
  kernels = set(artifact.manifest.dispatches)
  assert kernels and {p[4:-6] for p in artifact.files if p.startswith("msl/")} == kernels
  assert set(artifact.spirv()) == kernels
  for path, source in artifact.files.items():
    if path.startswith("msl/"):
      assert b"#include <metal_stdlib>" in source and b"kernel void" in source
  assert artifact.spirv() and not any(nnxc.find_races(spirv) for spirv in artifact.spirv().values())
  assert all(function.dispatch_count >= 1 for function in artifact.functions.values())


@pytest.mark.parametrize("name", list(ZOO))
def test_metal_spirv_passes_spirv_val(name, tmp_path):
  """The SPIR-V IREE translates into MSL is valid: the strongest Metal check without an Apple GPU."""
  spirv_val = spirv_tool("spirv-val")
  for kernel, binary in _artifact(name).spirv().items():
    path = tmp_path / f"{kernel}.spv"
    path.write_bytes(binary)
    result = subprocess.run([spirv_val, str(path)], capture_output=True, text=True)
    assert result.returncode == 0, f"{name}/{kernel}: {result.stderr}"


def test_ios_platform_is_selectable():
  artifact = _artifact("mlp", platform="ios")
  assert "--iree-metal-target-platform=ios" in artifact.manifest.flags and artifact.spirv()


def test_the_standin_compiles_with_the_metal_description_but_lavapipes_subgroup_width():
  metal = _targets.metal_description()
  standin = nnxc.get_target("metal-vulkan").description
  assert 'arch = "apple"' in metal and "storage = b64|b32|b16|b8" in metal
  assert re.sub(r"subgroup_size_choices = \[\d+\]", "", standin) == re.sub(
    r"subgroup_size_choices = \[\d+\]", "", metal
  )
  assert "subgroup_size_choices = [32]" in metal and "subgroup_size_choices = [16]" in standin


@pytest.mark.parametrize("name", ["mlp", "stacked_mlp", "lora_mlp"])
def test_with_metals_subgroup_width_the_standin_spirv_is_metals_spirv(name):
  """The stand-in is the Metal target's code generation: at 32 lanes its kernels are Metal's, word for word."""
  exact = nnxc.Target(**{**vars(nnxc.get_target("metal-vulkan")), "description": _targets.metal_description()})
  standin = nnxc.export(ZOO[name].make(0), _functions(name), target=exact, cache=False)
  assert standin.spirv() == _artifact(name).spirv()


@pytest.mark.parametrize("target", ["metal", "cuda"])
def test_runs_on_hardware_targets_where_present(target):
  """Parity on a real Metal or CUDA device; skipped with the reason on machines without one."""
  require_device(target)
  model, eager = ZOO["mlp"].make(0), ZOO["mlp"].make(0)
  args = ZOO["mlp"].example_args(BATCH, 0)
  outputs, state = (
    nnxc.export(model, _functions("mlp"), target=target).load().functional("train")(nnx.state(model), *args)
  )
  eager.train()
  assert_trees_allclose((outputs, state), (np.asarray(eager(*args)), nnx.state(eager)), **TOLERANCES["vulkan"])


def test_cuda_builds_without_a_gpu():
  artifact = nnxc.export(ZOO["mlp"].make(0), _functions("mlp"), target="cuda", cuda_arch="sm_89")
  assert artifact.manifest.dispatches and "--iree-cuda-target=sm_89" in artifact.manifest.flags
  # iree-compile 3.13 has no sm_90 description (iree-org/iree#22147): a clear CompileError, not a crash.
  with pytest.raises(nnxc.CompileError, match="missing GPU target"):
    nnxc.export(ZOO["mlp"].make(0), _functions("mlp"), target="cuda", cuda_arch="sm_90")


@pytest.mark.parametrize(("width", "driver"), [(64, "local-sync"), (1024, "local-task")])
def test_cpu_programs_default_to_the_thread_pool_where_it_pays(width, driver):
  """6 MFLOP a call stays on the caller's thread; 3 products of 256x1024 by 1024x1024 (1.6 GFLOP) go to the pool."""
  x = np.ones((256, width), np.float32)
  model = nnx.Sequential(*[nnx.Linear(width, width, rngs=nnx.Rngs(i)) for i in range(3)])
  artifact = nnxc.export(model, {"f": nnxc.method("__call__", x)}, target="cpu")
  assert artifact.load().driver == driver
  assert artifact.load(device="local-sync").driver == "local-sync"  # an explicit device always wins


def _stacked_mlp_train_step_at_batch_1():
  import optax

  model = ZOO["stacked_mlp"].make(0)
  objects = {"model": model, "optimizer": nnx.Optimizer(model, optax.sgd(1e-3), wrt=nnx.Param)}
  (x,) = ZOO["stacked_mlp"].example_args(1, 0)
  y = np.zeros(model(x).shape, np.float32)

  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda model: ((model(x) - y) ** 2).mean())(model)
    optimizer.update(model, grads)
    return loss

  return objects, {"step": nnxc.function(train_step, x, y)}, (x, y)


@pytest.mark.xfail(strict=True, raises=nnxc.CompileError, reason="IREE 3.13: data tiling fails a batch-1 vecmat")
def test_raw_data_tiling_fails_a_batch_1_train_step():
  cpu = nnxc.get_target("cpu")
  forced = nnxc.Target(**{**vars(cpu), "flags": (*cpu.flags, *cpu.speed_flags), "speed_flags": ()})
  objects, functions, _ = _stacked_mlp_train_step_at_batch_1()
  nnxc.export(objects, functions, target=forced, cache=False)


def test_a_program_data_tiling_cannot_compile_compiles_without_it():
  objects, functions, (x, y) = _stacked_mlp_train_step_at_batch_1()
  artifact = nnxc.export(objects, functions, target="cpu", cache=False)
  assert "--iree-opt-data-tiling=true" not in artifact.manifest.flags
  program = artifact.load()
  for _ in range(3):
    got, want = program.step(x, y), functions["step"].fn(*objects.values(), x, y)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# Kernel gradients of convolutions, rewritten on cpu as one matrix product over gathered windows:
# (input shape, kernel shape, stride, padding, kernel dilation).
KERNEL_GRADIENTS = {
  "3x3 SAME": ((2, 9, 9, 3), (3, 3, 3, 4), 1, "SAME", 1),
  "3x3 stride 2, odd width": ((2, 9, 8, 3), (3, 3, 3, 4), 2, "SAME", 1),
  "3x3 dilated 2": ((2, 10, 10, 3), (3, 3, 3, 4), 1, "SAME", 2),
  "1-D stride 2": ((2, 16, 3), (3, 3, 5), 2, "SAME", 1),
}


@pytest.mark.parametrize("case", list(KERNEL_GRADIENTS))
def test_convolution_kernel_gradients_on_cpu_are_matrix_products_and_match_jax(case):
  import jax

  x_shape, k_shape, stride, padding, dilation = KERNEL_GRADIENTS[case]
  spatial = len(x_shape) - 2
  numbers = ("NHWC", "HWIO", "NHWC") if spatial == 2 else ("NWC", "WIO", "NWC")

  def conv(x, k):
    return jax.lax.conv_general_dilated(
      x, k, (stride,) * spatial, padding, rhs_dilation=(dilation,) * spatial, dimension_numbers=numbers
    )

  def kernel_gradient(x, k, g):
    return jax.vjp(lambda k: conv(x, k), k)[1](g)[0]

  x, k = (np.asarray(jax.random.normal(jax.random.key(i), s)) for i, s in enumerate((x_shape, k_shape)))
  g = np.asarray(jax.random.normal(jax.random.key(2), conv(x, k).shape))

  class Gradient(nnx.Module):
    def __call__(self, x, k, g):
      return kernel_gradient(x, k, g)

  artifact = nnxc.export(Gradient(), {"f": nnxc.method("__call__", x, k, g)}, target="cpu")
  assert artifact.manifest.rewrites["kernel_gradients_as_products"] == 1
  np.testing.assert_allclose(artifact.load().f(x, k, g), kernel_gradient(x, k, g), rtol=1e-5, atol=1e-5)
