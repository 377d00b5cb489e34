"""The registry of StableHLO rewrites that keep IREE's code generation correct, above all SPIR-V's (metal, vulkan).

Each rewrite works around a miscompilation of IREE 3.13 reproduced in
``tests/test_spirv_bugs.py`` (strict xfails on the raw path, so we learn when IREE
is fixed) and is described in ``docs/metal-correctness.md``. They are IR passes on
the module JAX lowered, run in place before it is printed for iree-compile, and
only for the targets whose :attr:`Target.rewrites` name them. One is for speed, not
correctness: ``kernel_gradients_as_products`` (cpu only, see ``docs/benchmarks.md``).

This module owns their names: targets take the sequences below, and :func:`apply`
runs them. It imports no JAX itself (targets are described without it); each
rewrite's module is imported when it first runs.
"""

import importlib

# name -> the module (of this package) whose function of that name does it.
_MODULES = {
  "widen_bfloat16": "_bfloat16",
  "decompose_select_and_scatter": "_select_and_scatter",
  "kernel_gradients_as_products": "_kernel_gradient",
  "split_grouped_convolutions": "_grouped_convolutions",
  "isolate_reductions": "_isolation",
}
NAMES = tuple(_MODULES)

# What each kind of target runs, in order: every target's, then the cpu's or SPIR-V's.
COMMON = ("decompose_select_and_scatter",)
# The cpu only: the gathered windows cost a kernel each, a price a GPU pays per launch.
CPU = (*COMMON, "kernel_gradients_as_products")
SPIRV = ("widen_bfloat16", *COMMON, "split_grouped_convolutions", "isolate_reductions")

# Not a target's rewrite: export isolates the contractions of kernels that raced or failed to compile
# (``_isolation.isolate_sites``).
ISOLATE_CONTRACTIONS = "isolate_contractions"


def apply(module, names: tuple[str, ...]) -> dict[str, int]:
  """Runs the rewrites ``names`` on ``module`` (an MLIR module) in place; returns how many ops each changed."""
  return {name: getattr(importlib.import_module(f".{_MODULES[name]}", __name__), name)(module) for name in names}
