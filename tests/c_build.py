"""IREE's runtime, the C library and the test programs of tests/c/, built once per cache entry.

``nox -s tests`` runs this module before pytest, so that the build (minutes of both cores, the
first time) does not slow the tests it would run beside. (It was also suspected of making lavapipe
lose its device; it is not: the 8-lane Vulkan tests alone lost it too, see ``load_module`` in
compile/runtime/_device.py.)
The tests' ``c_build`` fixture calls :func:`build_test_programs` too; a second call finds the build done.
"""

import hashlib
import pathlib
import sys

from compile.runtime import deploy

TESTS_C = pathlib.Path(__file__).parent / "c"


def build_test_programs() -> dict[str, pathlib.Path]:
  """``{program: path}`` of ``nnx_run`` and ``fuzz_json``, and ``source``: the runtime tree built against.

  Raises:
    deploy.BuildError: no runtime source, CMake, Ninja or compiler, or the build failed.
  """
  source = deploy.iree_runtime_source()
  for name in ("cmake", "ninja"):
    deploy.tool(name)  # raises BuildError where it is missing, before any work
  # A new build folder when the sources' place or the CMake files change (their option defaults apply at configure).
  cmake_files = (TESTS_C / "CMakeLists.txt").read_text() + (deploy.LIBRARY / "CMakeLists.txt").read_text()
  key = hashlib.sha256(f"{source}\n{TESTS_C.resolve()}\n{cmake_files}".encode()).hexdigest()[:16]
  build_dir = source.parent / f"tests-{key}"
  deploy.build(TESTS_C, build_dir, iree_source=source, targets=("nnx_run", "fuzz_json"))
  return {"nnx_run": build_dir / "nnx_run", "fuzz_json": build_dir / "fuzz_json", "source": source}


if __name__ == "__main__":
  try:
    built = build_test_programs()
  except deploy.BuildError as e:  # the C tests then skip, or fail where NNX_METAL_REQUIRE says so
    print(f"The C runtime was not built: {e}", file=sys.stderr)
  else:
    print(f"The C runtime and its test programs: {built['nnx_run'].parent}")
