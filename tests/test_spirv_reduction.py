"""A reproducer of an IREE 3.13 SPIR-V code generation race, kept to notice when IREE fixes it.

``(x * (x - x.mean(0))).sum(0)`` for a 4x16 ``x`` compiles to a dispatch that sums
columns into workgroup memory in one loop and reads every column back in the next
loop with no ``OpControlBarrier`` in between. The Metal target's SPIR-V has the same
shape. On Mesa's lavapipe, lanes run 8 at a time, so columns 8-15 are read before
they are written. CPU is exact.
"""

import re

import jax
import numpy as np
import pytest

import compile as nnxc
from compile._build import compile_module
from compile._device import DeviceModule, open_device
from compile._stablehlo import clean_for_iree
from tests.conftest import require_device


def _centered_column_sums(x):
  return (x * (x - x.mean(0))).sum(0)


def _run(target: str, x: np.ndarray) -> np.ndarray:
  mlir, _ = clean_for_iree(jax.jit(_centered_column_sums).lower(x).compiler_ir("stablehlo"))
  binary = compile_module(mlir, "jit__centered_column_sums", nnxc.get_target(target))
  module = DeviceModule(binary.vmfb, open_device(nnxc.get_target(target).drivers[0]))
  (result,) = module.invoke(module.function("main"), [x])
  return module.to_host(result, np.dtype(np.float32))


@pytest.mark.parametrize(
  "target",
  ["cpu", pytest.param("vulkan", marks=pytest.mark.xfail(strict=True, reason="no barrier after the reduction"))],
)
def test_centered_column_sums(target):
  require_device(target)
  x = np.asarray(jax.random.normal(jax.random.key(0), (4, 16)))
  np.testing.assert_allclose(_run(target, x), _centered_column_sums(x), rtol=1e-5, atol=1e-5)


def test_the_metal_spirv_has_no_barrier_either():
  x = jax.ShapeDtypeStruct((4, 16), "float32")
  mlir, _ = clean_for_iree(jax.jit(_centered_column_sums).lower(x).compiler_ir("stablehlo"))
  binary = compile_module(mlir, "jit__centered_column_sums", nnxc.get_target("metal"))
  reductions = [name for name in binary.msl if "dispatch_0" in name]
  assert reductions, binary.msl.keys()
  kernel = binary.msl[reductions[0]].split("kernel void", 1)[1]
  assert re.search(r"threadgroup \w+ _workgroup_mem", kernel)  # the column sums live in threadgroup memory
  assert "threadgroup_barrier" not in kernel  # and nothing orders their writes before their reads
