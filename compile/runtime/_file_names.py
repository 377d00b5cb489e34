"""The files an artifact is made of: their names, in one place (export, the cache, open and save read them here).

Layout::

  manifest.json   what the module is (see _manifest.py), with the sha256 of every other file
  module.vmfb     the IREE module
  params.irpa     the state, one entry per variable (IREE parameter archive)
  module.mlir     the MLIR that was compiled
  msl/            Metal Shading Language source per kernel (metal)
  spirv/          SPIR-V per kernel (metal, metal-vulkan, vulkan), to re-check for races
"""

import re

FORMAT = "nnx-metal-artifact"
FORMAT_VERSION = 5  # 3: no compile_seconds; global names taken get $2, $3, ...; 4: output pytree kinds;
# 5: state no function writes is constant on the device, nnx_set_state takes only the written variables
MANIFEST = "manifest.json"
MODULE = "module.vmfb"
PARAMS = "params.irpa"
MLIR = "module.mlir"
MAX_MANIFEST_BYTES = 64 << 20
# Kernel sources, one file per kernel: {folder: suffix}.
KERNEL_FOLDERS = {"msl": "metal", "spirv": "spv"}
KERNEL_NAME = re.compile(r"[A-Za-z0-9_]+")


def kernel_file(folder: str, kernel: str) -> str:
  """The artifact's file of ``kernel``'s source in ``folder`` (``spirv/main_dispatch_0.spv``)."""
  return f"{folder}/{kernel}.{KERNEL_FOLDERS[folder]}"


def kernel_files(files, folder: str) -> dict[str, bytes]:
  """``{kernel: contents}`` of the kernel sources in ``folder`` among ``files`` (``{relative path: bytes}``)."""
  prefix, suffix = f"{folder}/", f".{KERNEL_FOLDERS[folder]}"
  return {path[len(prefix) : -len(suffix)]: data for path, data in files.items() if path.startswith(prefix)}


def is_safe_file_name(relative: str) -> bool:
  """Only the files an artifact is made of: no directories of its own, no ``..``, no absolute paths."""
  if relative in (MODULE, PARAMS, MLIR):
    return True
  folder, _, file_name = relative.partition("/")
  stem, _, suffix = file_name.rpartition(".")
  return KERNEL_FOLDERS.get(folder) == suffix and KERNEL_NAME.fullmatch(stem) is not None
