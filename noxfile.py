"""Sessions: `nox -s metal` builds Metal artifacts, `nox -s tests` runs the tests, `bench`, `docs`, `lint`."""

import os
import shutil
import tempfile

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests"]

# The Vulkan ICD of Mesa's lavapipe (a CPU Vulkan driver) runs the SPIR-V code
# generation that the Metal target is built on; spirv-val validates that SPIR-V.
# Headless Chromium renders the HTML inspection report in its test.
SYSTEM_PACKAGES = {
  "mesa-vulkan-drivers": "/usr/share/vulkan/icd.d/lvp_icd.x86_64.json",
  "spirv-tools": "spirv-val",
  "chromium": "chromium",
  "chromium-driver": "chromedriver",
}


def _missing_system_packages() -> list[str]:
  return [pkg for pkg, probe in SYSTEM_PACKAGES.items() if not (os.path.exists(probe) or shutil.which(probe))]


def _install_system_packages(session: nox.Session) -> None:
  """Installs the Debian packages the Vulkan and SPIR-V tests need, where we can."""
  missing = _missing_system_packages()
  if not missing:
    return
  if shutil.which("apt-get") and os.geteuid() == 0:
    session.run("apt-get", "update", "-q", external=True)
    session.run("apt-get", "install", "-y", "-q", "libvulkan1", *missing, external=True)
  else:
    session.warn(f"Install {', '.join(missing)} for the Vulkan, SPIR-V and report tests; they skip without them.")


# lavapipe's lane width is fixed when it loads: 512 bits (16 lanes) for the Metal stand-in,
# 256 (its default, 8 lanes) for a second run of the vulkan tests where races show most.
# The tests keep Mesa's shader cache in one directory per width (tests/conftest.py); elsewhere it is
# off, since its keys ignore the width.
STANDIN_LANES = {"LP_NATIVE_VECTOR_WIDTH": "512"}
EIGHT_LANES = {"LP_NATIVE_VECTOR_WIDTH": "256"}
NO_SHADER_CACHE = {"MESA_SHADER_CACHE_DISABLE": "true"}


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
  """Runs the test suite: parity on cpu, vulkan and the Metal stand-in, Metal builds, errors, attacks."""
  _install_system_packages(session)
  session.install("-e", ".[test]")
  # One compile cache for both runs (lane width changes how lavapipe runs kernels, not what
  # iree-compile makes), fresh each session; tests run in one worker per core (pytest-xdist).
  cache = {"NNX_METAL_TEST_CACHE": tempfile.mkdtemp(prefix="nnx-metal-test-cache-")}
  session.run("python", "-m", "tests.c_build")  # before the tests, not beside them (tests/c_build.py)
  try:
    # loadgroup: tests in one xdist_group (a catalog entry's targets) share a worker, and its eager reference.
    # Reruns: lavapipe loses its Vulkan device now and then (IREE reports DATA_LOSS; in about one run in
    # three here, one test); a test that failed with DATA_LOSS runs once more, on a new device (the next
    # load replaces a lost one, compile/runtime/_device.py). pytest reports each rerun; a failure that
    # comes back fails the run.
    workers = ("-n", "auto", "--dist", "loadgroup", "--reruns", "1", "--only-rerun", "DATA_LOSS")
    session.run("pytest", *workers, "--durations=25", *session.posargs, env={**STANDIN_LANES, **cache})
    if not session.posargs:
      session.run("pytest", *workers, "-m", "target_vulkan", "-q", env={**EIGHT_LANES, **cache})
  finally:
    shutil.rmtree(cache["NNX_METAL_TEST_CACHE"], ignore_errors=True)


@nox.session(python="3.11")
def metal(session: nox.Session) -> None:
  """Compiles every zoo model for Metal into build/metal/<model>/ and prints a table."""
  session.install("-e", ".[models]")
  session.run(
    "python", "-m", "nnx_models.tools.build_zoo", "--target", "metal", "--out", "build/metal", *session.posargs
  )


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
  """Runs ruff."""
  session.install("ruff")
  session.run("ruff", "check", ".")
  session.run("ruff", "format", "--check", ".")


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
  """Benchmarks programs against jax.jit and nnx.jit; writes build/bench/bench.{json,md}."""
  _install_system_packages(session)  # the dynamic-shape tier runs on the Metal stand-in too
  session.install("-e", ".[test]")  # the C tier builds IREE's runtime with cmake and ninja
  session.run(
    "python",
    "-m",
    "nnx_models.tools.bench",
    "--out",
    "build/bench",
    *session.posargs,
    env={**STANDIN_LANES, **NO_SHADER_CACHE},
  )


@nox.session(python="3.11")
def docs(session: nox.Session) -> None:
  """Builds the documentation (Sphinx with MyST) into build/docs, offline; warnings are errors."""
  session.install("-e", ".[docs,models]")
  session.run("sphinx-build", "-W", "-b", "html", "docs", "build/docs", *session.posargs)
