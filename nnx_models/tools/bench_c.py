"""The C runtime's numbers: per-call time against the Python Program and a raw IREE invoke, build times, sizes.

``run(out_dir)`` returns a dict and writes ``out_dir/bench_c.{json,md}``:

- per call (µs), for each small zoo model's eval function on the cpu target (local-sync and
  local-task): the C library (``nnx_program_call`` through tests/c/nnx_run), a raw IREE invoke of
  the same function with the same copies in and out (tests/c/bench_raw, no nnx-metal code), and
  the Python ``compile.runtime.Program``. Each is the minimum over ``REPEATS`` runs of ``CALLS``
  calls, interleaved, because a shared machine's noise only ever adds time;
- the build time of IREE's runtime with the library and the test programs, from a clean build
  folder (2 jobs), and of the library alone;
- the size of ``libnnx_metal.a`` and of a minimal app (``nnx-metal deploy``'s demo for the MLP,
  stripped), which runs the MLP.

Run as ``python -m nnx_models.tools.bench_c --out build/bench``.
"""

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
from iree import runtime as rt

import compile as nnxc
from compile.runtime import deploy
from nnx_models import ZOO

TESTS_C = pathlib.Path(__file__).resolve().parents[2] / "tests" / "c"
CALLS = 2000
REPEATS = 5
DRIVERS = ("local-sync", "local-task")


def _microseconds(output: str) -> float:
  return float(re.search(r"microseconds_per_call ([0-9.]+)", output).group(1))


def _python_per_call(program, name: str, inputs: list[np.ndarray]) -> float:
  function = program.functions[name]
  for _ in range(20):
    function(*inputs)
  start = time.perf_counter()
  for _ in range(CALLS):
    function(*inputs)
  return (time.perf_counter() - start) / CALLS * 1e6


def _export_zoo(root: pathlib.Path) -> dict[str, pathlib.Path]:
  directories = {}
  for name, entry in ZOO.items():
    directory = root / name
    if not (directory / "manifest.json").exists():
      args = entry.example_args(8, 0)
      nnxc.export(entry.make(0), {"eval": nnxc.method("__call__", *args, mode="eval")}, target="cpu").save(directory)
    directories[name] = directory
  return directories


def _per_call(build: pathlib.Path, directory: pathlib.Path, driver: str, work: pathlib.Path) -> dict[str, float]:
  artifact = nnxc.Artifact.open(directory)
  spec = artifact.functions["eval"]
  inputs = [np.full(t.shape, 0.5, np.dtype(t.dtype)) for t in spec.inputs]
  for i, array in enumerate(inputs):
    array.tofile(work / f"in{i}.bin")
  module_name = rt.VmModule.copy_buffer(rt.VmInstance(), artifact.vmfb).name
  shapes = ["x".join(map(str, t.shape)) or "scalar" for t in spec.inputs]
  program = nnxc.load_program(directory, device=driver)
  times = {"c": [], "raw": [], "python": []}
  for _ in range(REPEATS):
    c = subprocess.run(
      [str(build / "nnx_run"), str(directory), "--driver", driver, "call", "eval", str(work / "in"), str(work / "o")]
      + ["time", "eval", str(work / "in"), str(CALLS)],
      capture_output=True,
      text=True,
      check=True,
    )
    times["c"].append(_microseconds(c.stdout))
    raw = subprocess.run(
      [str(build / "bench_raw"), str(directory / "module.vmfb"), str(directory / "params.irpa"), driver]
      + [f"{module_name}.eval", str(CALLS), *shapes],
      capture_output=True,
      text=True,
      check=True,
    )
    times["raw"].append(_microseconds(raw.stdout))
    times["python"].append(_python_per_call(program, "eval", inputs))
  return {kind: min(values) for kind, values in times.items()}


def _timed_build(project: pathlib.Path, build_dir: pathlib.Path, source: pathlib.Path, targets) -> float:
  start = time.perf_counter()
  deploy.build(project, build_dir, iree_source=source, targets=targets)
  return time.perf_counter() - start


def _stripped_size(binary: pathlib.Path, work: pathlib.Path) -> int:
  strip = shutil.which("strip")
  if strip is None:
    return binary.stat().st_size
  copy = work / f"{binary.name}.stripped"
  shutil.copyfile(binary, copy)
  subprocess.run([strip, str(copy)], check=True)
  return copy.stat().st_size


def run(out_dir: str | os.PathLike) -> dict:
  """Measures everything (about 10 minutes on 2 cores, most of it two builds of IREE's runtime)."""
  out = pathlib.Path(out_dir)
  work = out / "c"
  shutil.rmtree(work, ignore_errors=True)
  work.mkdir(parents=True)
  source = deploy.iree_runtime_source()
  results: dict = {"calls": CALLS, "repeats": REPEATS, "iree_commit": deploy.IREE_COMMIT}

  build = work / "build"
  results["runtime_and_library_build_s"] = _timed_build(TESTS_C, build, source, ("nnx_run", "bench_raw"))
  for name in deploy.LIBRARY_FILES:
    if name.endswith(".c"):
      os.utime(deploy.LIBRARY / name)
  results["library_build_s"] = _timed_build(TESTS_C, build, source, ("nnx_metal",))
  results["library_bytes"] = next(build.rglob("libnnx_metal.a")).stat().st_size

  with jax.numpy_dtype_promotion("standard"):
    zoo = _export_zoo(work / "zoo")
  results["per_call_us"] = {driver: {} for driver in DRIVERS}
  for driver in DRIVERS:
    for name, directory in zoo.items():
      try:
        results["per_call_us"][driver][name] = _per_call(build, directory, driver, work)
      except subprocess.CalledProcessError as e:  # one failure does not lose the other numbers
        results["per_call_us"][driver][name] = {"error": f"{e.cmd[0]} exited {e.returncode}: {e.stderr[-300:]}"}

  project = work / "mlp_app"
  deploy.write_project(zoo["mlp"], project, name="mlp", iree_source=source)
  results["minimal_app_build_s"] = _timed_build(project, work / "mlp_app_build", source, ("mlp_demo",))
  app = work / "mlp_app_build" / "mlp_demo"
  subprocess.run([str(app), str(project / "artifact")], check=True, capture_output=True)
  results["minimal_app_bytes"] = app.stat().st_size
  results["minimal_app_stripped_bytes"] = _stripped_size(app, work)

  (out / "bench_c.json").write_text(json.dumps(results, indent=1) + "\n")
  (out / "bench_c.md").write_text(markdown(results))
  return results


def markdown(results: dict) -> str:
  lines = [
    "| driver | model | C library (µs) | raw IREE invoke (µs) | C / raw | Python Program (µs) |",
    "|---|---|---:|---:|---:|---:|",
  ]
  for driver, models in results["per_call_us"].items():
    for name, t in models.items():
      if "error" in t:
        lines.append(f"| {driver} | {name} | failed: {t['error'][:80]} | | | |")
        continue
      lines.append(
        f"| {driver} | {name} | {t['c']:.1f} | {t['raw']:.1f} | {t['c'] / t['raw']:.2f}x | {t['python']:.1f} |"
      )
  lines += [
    "",
    f"Per call: minimum over {results['repeats']} runs of {results['calls']} calls (inputs copied in, outputs "
    "copied out).",
    "",
    "| build or binary | value |",
    "|---|---:|",
    f"| IREE runtime + library + test programs, clean, 2 jobs | {results['runtime_and_library_build_s']:.0f} s |",
    f"| library alone (nnx_metal.c, nnx_json.c, nnx_sha256.c) | {results['library_build_s']:.1f} s |",
    f"| libnnx_metal.a | {results['library_bytes'] / 1024:.0f} KiB |",
    f"| minimal app running the MLP (deploy demo), clean build | {results['minimal_app_build_s']:.0f} s |",
    f"| minimal app, stripped (IREE runtime linked in) | {results['minimal_app_stripped_bytes'] / 1024:.0f} KiB |",
    "",
  ]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("build/bench"))
  options = parser.parse_args(argv)
  print(markdown(run(options.out)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
