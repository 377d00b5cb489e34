"""Running an artifact without Python: the C library's sources, IREE's runtime source, and a C project per artifact.

The C library (``compile/runtime/c/``: ``nnx_metal.h``, its sources and CMakeLists.txt) ships
inside this package. :func:`write_project` writes a self-contained CMake project for one artifact:
typed wrappers per exported function, the library, the artifact, a demo program, a Swift module map
and a README for macOS and iOS. :func:`iree_runtime_source` prepares IREE's runtime source tree
(the vendored snapshot, unpacked and patched once, cached by its sha256) and :func:`build` runs
CMake and Ninja on a project, quietly (the log goes to a file). Imports no JAX.
"""

import contextlib
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator

from ._artifact import Artifact
from ._errors import ArtifactError, CompileError
from ._file_names import MANIFEST
from ._records import Tensor

LIBRARY = pathlib.Path(__file__).parent / "c"
LIBRARY_FILES = (
  "nnx_metal.h",
  "nnx_metal.c",
  "nnx_json.h",
  "nnx_json.c",
  "nnx_sha256.h",
  "nnx_sha256.c",
  "CMakeLists.txt",
)
PATCHES = LIBRARY / "patches"
# The IREE commit the vendored runtime source is from (see nnx_metal.h NNX_METAL_IREE_RUNTIME_COMMIT).
IREE_COMMIT = "b48a5955575cf8924ffc191f3b0804976e5738b9"
VENDORED_TARBALL = "iree-runtime-src.tar.xz"

C_TYPES = {
  "bool": "bool",
  "int8": "int8_t",
  "int16": "int16_t",
  "int32": "int32_t",
  "int64": "int64_t",
  "uint8": "uint8_t",
  "uint16": "uint16_t",
  "uint32": "uint32_t",
  "uint64": "uint64_t",
  "float16": "uint16_t",  # IEEE half bits
  "bfloat16": "uint16_t",  # bfloat16 bits
  "float32": "float",
  "float64": "double",
  "complex64": "float",  # as [..., 2] (real, imaginary)
  "complex128": "double",
  "float8_e4m3fn": "uint8_t",
  "float8_e5m2": "uint8_t",
}


class BuildError(CompileError):
  """CMake or the C compiler failed; the message holds the end of the build log and its path."""


def cache_root() -> pathlib.Path:
  """Where prepared runtime sources and builds are kept: ``$NNX_METAL_C_CACHE`` or ``~/.cache/nnx-metal/c``."""
  configured = os.environ.get("NNX_METAL_C_CACHE")
  if configured:
    return pathlib.Path(configured)
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "nnx-metal" / "c"


def vendored_tarball() -> pathlib.Path | None:
  """IREE's runtime source snapshot: ``$NNX_METAL_IREE_SRC``, else ``shared/vendor/`` beside the repository."""
  configured = os.environ.get("NNX_METAL_IREE_SRC")
  if configured:
    return pathlib.Path(configured)
  repository = pathlib.Path(__file__).resolve().parents[2]
  candidate = repository.parent / "shared" / "vendor" / VENDORED_TARBALL
  return candidate if candidate.is_file() else None


def _sha256_file(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


@contextlib.contextmanager
def _exclusive(lock_path: pathlib.Path) -> Iterator[None]:
  """One process at a time (pytest-xdist workers, parallel CI jobs) prepares or builds in one cache entry."""
  import fcntl

  lock_path.parent.mkdir(parents=True, exist_ok=True)
  with open(lock_path, "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def apply_patch(tree: pathlib.Path, patch: str) -> None:
  """Applies a unified diff (``patch -p1``) whose hunks must match exactly; raises BuildError where one does not."""
  target, hunks = None, []
  lines = patch.splitlines(keepends=True)
  i = 0
  while i < len(lines):
    line = lines[i]
    if line.startswith("+++ "):
      target = tree / line[4:].split("\t")[0].strip().split("/", 1)[1]
    elif line.startswith("@@") and target is not None:
      old, new = [], []
      i += 1
      while i < len(lines) and lines[i][:1] in (" ", "-", "+", "\\"):
        kind, text = lines[i][:1], lines[i][1:]
        if kind in (" ", "-"):
          old.append(text)
        if kind in (" ", "+"):
          new.append(text)
        i += 1
      hunks.append((target, "".join(old), "".join(new)))
      continue
    i += 1
  for path, old, new in hunks:
    text = path.read_text()
    if text.count(old) != 1:
      raise BuildError(f"The patch does not apply to {path}: the IREE source is not the snapshot it was written for.")
    path.write_text(text.replace(old, new))


def iree_runtime_source(tarball: pathlib.Path | None = None) -> pathlib.Path:
  """IREE's runtime source tree, unpacked from the vendored snapshot and patched, cached by their sha256.

  ``$NNX_METAL_IREE_SRC`` may name the tarball or an IREE source tree (used as it is; apply the
  patches in ``compile/runtime/c/patches/`` to it yourself).

  Raises:
    BuildError: no snapshot here (clone IREE at ``IREE_COMMIT`` and set ``$NNX_METAL_IREE_SRC``).
  """
  tarball = tarball or vendored_tarball()
  if tarball is not None and tarball.is_dir():
    return tarball
  if tarball is None or not tarball.is_file():
    raise BuildError(
      f"IREE's runtime source is not here: put {VENDORED_TARBALL} in shared/vendor/ beside the repository, or set "
      f"NNX_METAL_IREE_SRC to it or to a clone of https://github.com/iree-org/iree at {IREE_COMMIT} "
      "(with its submodules third_party/flatcc and third_party/vulkan_headers)."
    )
  key = hashlib.sha256(_sha256_file(tarball).encode())
  for patch in sorted(PATCHES.glob("*.patch")):
    key.update(patch.read_bytes())
  entry = cache_root() / f"iree-{key.hexdigest()[:16]}"
  source = entry / "src"
  with _exclusive(entry.with_suffix(".lock")):
    if not (entry / "complete").exists():
      shutil.rmtree(entry, ignore_errors=True)
      source.mkdir(parents=True)
      with tarfile.open(tarball) as archive:
        archive.extractall(source, filter="data")
      for patch in sorted(PATCHES.glob("*.patch")):
        apply_patch(source, patch.read_text())
      (entry / "complete").write_text(str(tarball))
  return source


def tool(name: str) -> str:
  """``cmake`` or ``ninja`` from the Python environment (the PyPI packages), else from PATH."""
  beside = pathlib.Path(sys.executable).parent / name
  found = str(beside) if beside.exists() else shutil.which(name)
  if found is None:
    raise BuildError(f"{name} is not installed: pip install {name} (the test extra has it).")
  return found


def build(
  project: pathlib.Path,
  build_dir: pathlib.Path,
  *,
  iree_source: pathlib.Path,
  targets: tuple[str, ...] = (),
  jobs: int = 2,
  build_type: str = "Release",
) -> pathlib.Path:
  """Configures (once) and builds a CMake project with Ninja; output goes to ``build_dir/build.log``.

  Holds a lock on ``build_dir`` so that concurrent callers build once. Returns ``build_dir``.

  Raises:
    BuildError: CMake or the compiler failed (the message ends with the log's last lines).
  """
  build_dir.mkdir(parents=True, exist_ok=True)
  log = build_dir / "build.log"
  with _exclusive(build_dir.parent / f".{build_dir.name}.lock"):
    commands = []
    if not (build_dir / "build.ninja").exists():
      commands.append(
        [
          tool("cmake"),
          "-G",
          "Ninja",
          f"-DCMAKE_MAKE_PROGRAM={tool('ninja')}",
          f"-DCMAKE_BUILD_TYPE={build_type}",
          f"-DNNX_METAL_IREE_SOURCE_DIR={iree_source}",
          "-S",
          str(project),
          "-B",
          str(build_dir),
        ]
      )
    commands.append(
      [tool("cmake"), "--build", str(build_dir), "-j", str(jobs), *[a for t in targets for a in ("--target", t)]]
    )
    with open(log, "a") as out:
      for command in commands:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
        if result.returncode != 0:
          tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
          raise BuildError(f"{command[0]} failed ({result.returncode}); the end of {log}:\n{tail}")
  return build_dir


# The per-artifact project.


def c_identifier(text: str, taken: set[str]) -> str:
  """``text`` as a C identifier not in ``taken`` (which it joins): ``args[0]`` -> ``args_0``."""
  name = re.sub(r"[^A-Za-z0-9_]+", "_", text).strip("_") or "value"
  if name[0].isdigit():
    name = f"v_{name}"
  candidate, n = name, 2
  while candidate in taken:
    candidate, n = f"{name}_{n}", n + 1
  taken.add(candidate)
  return candidate


def _declarator(tensor: Tensor, name: str, *, const: bool) -> str:
  dims = "".join(f"[{d}]" for d in tensor.shape) + ("[2]" if tensor.dtype.startswith("complex") else "")
  qualifier = "const " if const else ""
  return f"{qualifier}{C_TYPES[tensor.dtype]} {name}{dims}" if dims else f"{qualifier}{C_TYPES[tensor.dtype]} *{name}"


def _wrappers(prefix: str, artifact: Artifact) -> tuple[str, str]:
  """The typed header and source for ``artifact``'s functions."""
  guard = f"{prefix.upper()}_H_"
  header = [
    f"// Typed calls into the nnx-metal program {prefix!r}. Written by `nnx-metal deploy`; do not edit.",
    f"#ifndef {guard}",
    f"#define {guard}",
    "",
    "#include <stdbool.h>",
    "#include <stdint.h>",
    "",
    '#include "nnx_metal.h"',
    "",
    '#ifdef __cplusplus\nextern "C" {\n#endif',
    "",
    f"// The digest of the artifact these wrappers were written for: {prefix}_open refuses any other.",
    f'#define {prefix.upper()}_DIGEST "{artifact.digest}"',
    "",
    f"// Opens the artifact directory (pinned to {prefix.upper()}_DIGEST); driver NULL picks the target's default.",
    f"nnx_code_t {prefix}_open(const char *artifact_directory, const char *driver, nnx_program_t **out, "
    "nnx_error_t *error);",
    "",
  ]
  source = [
    f"// Typed calls into the nnx-metal program {prefix!r}. Written by `nnx-metal deploy`; do not edit.",
    f'#include "{prefix}.h"',
    "",
    "#include <stddef.h>",
    "",
    f"nnx_code_t {prefix}_open(const char *artifact_directory, const char *driver, nnx_program_t **out, "
    "nnx_error_t *error) {",
    f"  nnx_open_options_t options = {{driver, {prefix.upper()}_DIGEST}};",
    "  return nnx_program_open(artifact_directory, &options, out, error);",
    "}",
    "",
    "// The function `name` of the program, after checking it has the sizes these wrappers were written for.",
    "static const nnx_function_t *lookup(nnx_program_t *program, const char *name, size_t inputs,",
    "                                    const size_t *in_bytes, size_t outputs, const size_t *out_bytes) {",
    "  const nnx_function_t *f = nnx_program_find_function(program, name);",
    "  if (!f || f->input_count != inputs || f->output_count != outputs) return NULL;",
    "  for (size_t i = 0; i < inputs; ++i) if (f->inputs[i].byte_length != in_bytes[i]) return NULL;",
    "  for (size_t i = 0; i < outputs; ++i) if (f->outputs[i].byte_length != out_bytes[i]) return NULL;",
    "  return f;",
    "}",
    "",
  ]
  for function in artifact.functions.values():
    taken: set[str] = {"program", "error", "nnx_f", "nnx_inputs", "nnx_outputs", "in_bytes", "out_bytes", "lookup"}
    inputs = [(t, c_identifier(t.name, taken)) for t in function.inputs]
    outputs = [(t, c_identifier(t.name, taken)) for t in function.outputs]
    parameters = ["nnx_program_t *program"]
    parameters += [_declarator(t, n, const=True) for t, n in inputs]
    parameters += [_declarator(t, n, const=False) for t, n in outputs]
    parameters.append("nnx_error_t *error")
    signature = f"nnx_code_t {prefix}_{function.name}({', '.join(parameters)})"
    header.append(f"// {function.signature()}")
    header.append(f"{signature};")
    header.append("")

    def sizes(tensors):
      return ", ".join(f"{t.size * _itemsize(t.dtype)}u" for t, _ in tensors) or "0"

    source += [
      f"{signature} {{",
      f"  static const size_t in_bytes[] = {{{sizes(inputs)}}}, out_bytes[] = {{{sizes(outputs)}}};",
      f'  const nnx_function_t *nnx_f = lookup(program, "{function.name}", {len(inputs)}, in_bytes, {len(outputs)}, '
      "out_bytes);",
      "  if (!nnx_f) {",
      "    if (error) {",
      "      error->code = NNX_ERROR_SIGNATURE;",
      f'      snprintf(error->message, sizeof(error->message), "This program has no function {function.name} with '
      'the signature these wrappers were written for: deploy the artifact again.");',
      "    }",
      "    return NNX_ERROR_SIGNATURE;",
      "  }",
      f"  const void *const nnx_inputs[] = {{{', '.join(n for _, n in inputs) or 'NULL'}}};",
      f"  void *const nnx_outputs[] = {{{', '.join(n for _, n in outputs) or 'NULL'}}};",
      "  return nnx_program_call(program, nnx_f, nnx_inputs, nnx_outputs, error);",
      "}",
      "",
    ]
  header += ['#ifdef __cplusplus\n}  // extern "C"\n#endif', "", f"#endif  // {guard}", ""]
  source.insert(3, "#include <stdio.h>")
  return "\n".join(header), "\n".join(source)


def _itemsize(dtype: str) -> int:
  return {"bool": 1, "int8": 1, "uint8": 1, "float8_e4m3fn": 1, "float8_e5m2": 1, "int16": 2, "uint16": 2}.get(
    dtype,
    {"float16": 2, "bfloat16": 2, "int32": 4, "uint32": 4, "float32": 4, "complex64": 8, "complex128": 16}.get(
      dtype, 8
    ),
  )


def _demo(prefix: str, artifact: Artifact) -> str:
  """A program that opens the artifact, calls every function once in export order on fixed inputs, prints outputs."""
  lines = [
    f"// {prefix}_demo: opens the artifact, calls each function once on inputs[i] = (i % 7) * 0.25 - 0.5 (as the",
    "// element type), prints every output element (%.9g). Written by `nnx-metal deploy`.",
    "#include <stdio.h>",
    "#include <stdlib.h>",
    "",
    f'#include "{prefix}.h"',
    "",
    "static int check(nnx_code_t code, const nnx_error_t *error) {",
    '  if (code) fprintf(stderr, "%s: %s\\n", nnx_code_name(code), error->message);',
    "  return code != NNX_OK;",
    "}",
    "",
    "int main(int argc, char **argv) {",
    '  const char *artifact = argc > 1 ? argv[1] : "artifact";',
    "  const char *driver = argc > 2 ? argv[2] : NULL;",
    "  nnx_program_t *program = NULL;",
    "  nnx_error_t error;",
    f"  if (check({prefix}_open(artifact, driver, &program, &error), &error)) return 1;",
  ]
  for function in artifact.functions.values():
    taken: set[str] = set()
    names = [c_identifier(t.name, taken) for t in (*function.inputs, *function.outputs)]
    args = []
    lines.append("  {")
    for tensor, name in zip((*function.inputs, *function.outputs), names, strict=True):
      ctype, count = C_TYPES[tensor.dtype], tensor.size * (2 if tensor.dtype.startswith("complex") else 1)
      lines.append(f"    {ctype} *{name} = calloc({max(count, 1)}, sizeof({ctype}));")
      args.append(f"(void *){name}" if tensor.shape else name)
    for tensor, name in zip(function.inputs, names[: len(function.inputs)], strict=True):
      count = tensor.size * (2 if tensor.dtype.startswith("complex") else 1)
      lines.append(
        f"    for (long i = 0; i < {count}; ++i) {name}[i] = ({C_TYPES[tensor.dtype]})((i % 7) * 0.25 - 0.5);"
      )
    lines.append(f"    if (check({prefix}_{function.name}(program, {', '.join(args)}, &error), &error)) return 1;")
    for tensor, name in zip(function.outputs, names[len(function.inputs) :], strict=True):
      count = tensor.size * (2 if tensor.dtype.startswith("complex") else 1)
      lines.append(f'    printf("{function.name} {tensor.name}");')
      lines.append(f'    for (long i = 0; i < {count}; ++i) printf(" %.9g", (double){name}[i]);')
      lines.append('    printf("\\n");')
    lines += [f"    free({name});" for name in names]
    lines.append("  }")
  lines += ["  nnx_program_close(program);", "  return 0;", "}", ""]
  return "\n".join(lines)


def _cmake(prefix: str, iree_source: pathlib.Path | None) -> str:
  default = str(iree_source) if iree_source else ""
  return f"""# The {prefix} program as a C library ({prefix}.h) and a demo executable. Written by `nnx-metal deploy`.
#
#   cmake -G Ninja -S . -B build [-DNNX_METAL_IREE_SOURCE_DIR=<IREE source tree>] && cmake --build build
#   build/{prefix}_demo artifact
cmake_minimum_required(VERSION 3.21)
project({prefix} C CXX)

set(NNX_METAL_IREE_SOURCE_DIR "{default}" CACHE PATH "IREE's source tree (runtime/ is built)")
add_subdirectory(nnx_metal)

add_library({prefix} STATIC {prefix}.c)
target_link_libraries({prefix} PUBLIC nnx_metal)
target_include_directories({prefix} PUBLIC "${{CMAKE_CURRENT_SOURCE_DIR}}")

add_executable({prefix}_demo demo.c)
target_link_libraries({prefix}_demo PRIVATE {prefix})
"""


def _readme(prefix: str, artifact: Artifact) -> str:
  calls = "\n".join(f"    {f.signature()}" for f in artifact.functions.values())
  return f"""# {prefix}: an nnx-metal program as C

Written by `nnx-metal deploy` for the artifact in `artifact/` (target `{artifact.target}`, digest
`{artifact.digest}`). Its functions:

{calls}

- `{prefix}.h`, `{prefix}.c`: one typed C function per exported function; `{prefix}_open` pins the digest.
- `nnx_metal/`: the nnx-metal C library (`nnx_metal.h`) over IREE's runtime; see its header for the API
  (state by name, save, errors, threads).
- `demo.c`: opens the artifact and calls each function once.
- `module.modulemap`: exposes both headers to Swift as the module `NNXMetal`.

## Build and run (Linux, macOS)

    cmake -G Ninja -S . -B build -DNNX_METAL_IREE_SOURCE_DIR=/path/to/iree
    cmake --build build
    build/{prefix}_demo artifact

IREE's source tree: `git clone https://github.com/iree-org/iree` at commit `{IREE_COMMIT}` (the
runtime nnx-metal tests with), then `git submodule update --init third_party/flatcc
third_party/vulkan_headers`; or the release tag of the iree-base-compiler that compiled the artifact
(`{artifact.manifest.versions.get("iree-base-compiler", "?")}`). Only the runtime is built (1.5 to 4 minutes on
2 cores).

## macOS and iOS

- Export for the `metal` target (`nnx-metal build ... --target metal`); such an artifact runs on IREE's
  `metal` driver, which `nnx_metal/CMakeLists.txt` turns on for Apple platforms (`IREE_HAL_DRIVER_METAL`).
- iOS: configure the runtime for the device, e.g.
  `cmake -G Xcode -S . -B build-ios -DCMAKE_SYSTEM_NAME=iOS -DCMAKE_OSX_ARCHITECTURES=arm64
  -DCMAKE_OSX_DEPLOYMENT_TARGET=16.0 -DIREE_HAL_DRIVER_VULKAN=OFF -DIREE_HAL_DRIVER_LOCAL_TASK=OFF`, then link
  `lib{prefix}.a`, `libnnx_metal.a` and IREE's static libraries, and the `Metal` and `Foundation` frameworks.
- Bundle the `artifact/` folder as a resource (a folder reference) and open it from
  `Bundle.main.path(forResource: "artifact", ofType: nil)`.
- Swift: add this folder's headers to the target's import paths (`SWIFT_INCLUDE_PATHS`) with
  `module.modulemap`; then `import NNXMetal` and call `{prefix}_open(path, nil, &program, &error)` and the typed
  functions with `withUnsafeBufferPointer` / `withUnsafeMutableBufferPointer`.

What nnx-metal compiles and runs on its own machines: this project, the library and IREE's runtime on
Linux, on the `local-sync`, `local-task` and (Mesa lavapipe) `vulkan` drivers. Not compiled or run
there: the `metal` driver, Swift, Apple's Metal framework and a `.metallib`. Treat the Apple steps
above as directions, not as tested recipes.
"""


def write_project(
  artifact_directory: str | os.PathLike,
  out: str | os.PathLike,
  *,
  name: str | None = None,
  iree_source: pathlib.Path | None = None,
) -> pathlib.Path:
  """Writes a self-contained C project for one artifact into ``out`` (which must not exist or be empty).

  Args:
    artifact_directory: the artifact; opened and verified first.
    out: the project folder.
    name: the C prefix of its functions (default: the artifact folder's name).
    iree_source: IREE's source tree the project's CMake file defaults to (else set at configure time).

  Raises:
    ArtifactError: the artifact does not verify, or ``out`` holds something already.
  """
  artifact_directory = pathlib.Path(artifact_directory)
  artifact = Artifact.open(artifact_directory)
  prefix = c_identifier((name or artifact_directory.resolve().name).lower(), set())
  out = pathlib.Path(out)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise ArtifactError(f"{out} exists and is not empty; nothing was written. Choose a new folder.")
  out.mkdir(parents=True, exist_ok=True)
  shutil.copytree(LIBRARY, out / "nnx_metal", ignore=shutil.ignore_patterns("patches", "__pycache__"))
  artifact_copy = out / "artifact"
  artifact_copy.mkdir()
  for relative in (MANIFEST, *artifact.manifest.files):
    (artifact_copy / relative).parent.mkdir(exist_ok=True)
    shutil.copyfile(artifact_directory / relative, artifact_copy / relative)
  Artifact.open(artifact_copy, digest=artifact.digest)  # the copy is the artifact that was verified
  header, source = _wrappers(prefix, artifact)
  (out / f"{prefix}.h").write_text(header)
  (out / f"{prefix}.c").write_text(source)
  (out / "demo.c").write_text(_demo(prefix, artifact))
  (out / "CMakeLists.txt").write_text(_cmake(prefix, iree_source))
  (out / "module.modulemap").write_text(
    f'module NNXMetal {{\n  header "nnx_metal/nnx_metal.h"\n  header "{prefix}.h"\n  link "{prefix}"\n  export *\n}}\n'
  )
  (out / "README.md").write_text(_readme(prefix, artifact))
  return out
