"""Reliability: attacks on artifacts, programs and saves, each refused with an NnxMetalError or handled correctly.

Ten families of generated attacks (see docs/reliability.md). Every attack ends in one of:

- ``refused``: an :class:`compile.NnxMetalError` subclass was raised;
- ``handled``: accepted, and everything a caller gets (outputs, arrays, state) is exactly right;
- ``known_bug``: a crash of an open bug (``OPEN_BUGS``: only B7, a tampered module run without a
  pinned digest, which no check of its own files can stop; see its test). The other bugs of ``BUGS``
  were found by this module and fixed; each keeps a regression test (``test_fixed_*``), and an attack
  that hits one again counts as ``wrong``;
- ``raw``, ``crashed``, ``wrong``: anything else: another exception type escaping the library, the
  interpreter killed by a signal (or hung), or silently wrong data (including a file touched outside
  the artifact directory or code executed). Each family test fails on any of these.

The attacks that may kill the interpreter run in child processes (``_run_isolated``) that restart
after the case that crashed. The last test writes the counts per family to ``build/reliability.json``.
Generators are seeded (``random.Random``): every run tries the same attacks.
"""

import ast
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import random
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import tracemalloc

import jax
import numpy as np
import pytest
from flax import nnx

import compile as nnxc
from compile import cli
from compile.runtime import _artifact, _dtypes, _files
from compile.runtime._file_names import FORMAT_VERSION
from compile.runtime._manifest import Manifest
from nnx_models import ZOO, Linear
from tests.conftest import require_device

REPO = pathlib.Path(__file__).resolve().parent.parent
LIBRARY = REPO / "compile"
BATCH = 4
CANARY_NAME = "nnx-metal-reliability-canary"

FAMILIES = {
  "manifest": "1. manifest field fuzzing",
  "state": "2. state entries and input/output specs",
  "tamper": "3. file tampering",
  "paths": "4. path traversal and links",
  "saving": "5. saving",
  "inputs": "6. inputs",
  "threads": "7. threads",
  "cli": "8. the command line",
  "api": "9. Program API misuse",
  "resources": "10. disk space, permissions and names",
}
OUTCOMES = ("refused", "handled", "known_bug", "raw", "crashed", "wrong")
UNEXPLAINED = ("raw", "crashed", "wrong")

# Library bugs this module found. All are fixed but B7; each keeps the test named in its text.
BUGS = {
  "B1": "Manifest.from_json raises a raw TypeError for a list or object inside functions.<name>.updates "
  "(_manifest._one_of looks the value up in a frozenset: unhashable). test_fixed_updates_with_a_list",
  "B2": "Program.state / update / Artifact.saved_state (_program.nnx_state) pass manifest metadata as keyword "
  "arguments to the Variable class and key_impl to jax.random.wrap_key_data unchecked: metadata 'value' or "
  "'sharding', or key_impl 'rbg' on a threefry key, raise raw TypeError/ValueError; 'hijax': true makes the "
  "State hold a HijaxVariable instead of the manifest's class; 'on_get_value': 'x' is merged by "
  "Program.update into the user's model, whose variable then raises TypeError on every read. "
  "test_fixed_metadata_reaches_the_variable_constructor",
  "B3": "A state entry's global name is not checked against its name: swapping name and path of two entries "
  "of the same shape and dtype (or renaming one) opens, and arrays()/state() return one variable's values "
  "under the other's name. test_fixed_swapped_state_names_are_misread",
  "B4": "Signedness is not cross-checked (_artifact._signless, _declared drops {iree.abi.encoding}): editing "
  "int32 <-> uint32 (any intN <-> uintN) in a state entry or a function spec opens and reinterprets the "
  "bytes (-3 reads as 4294967293). test_fixed_signedness_edits_reinterpret_values",
  "B5": "Errors from IREE while a module is registered or invoked escape raw from _device.DeviceModule.__init__ "
  "and DeviceModule.invoke (RuntimeError, ValueError, IndexError, NotImplementedError, UnicodeDecodeError): a "
  "vmfb compiled for another device (a cpu artifact whose manifest says vulkan, a vulkan vmfb in a cpu "
  "artifact), or a rehashed vmfb whose executables or bytecode do not load. test_fixed_vmfb_for_another_device",
  "B6": "Malformed files that pass the hash check (the attacker recomputed it) make IREE raise IndexError, "
  "UnicodeDecodeError or RuntimeError (nanobind cannot decode a reflection string), which escape raw from "
  "_artifact._read_params (ParameterIndex.load) and _artifact.check_module / _check_declaration "
  "(VmModule.copy_buffer, function reflection): only RuntimeError/ValueError around the loads are caught. "
  "test_fixed_rehashed_params_header_flip",
  "B7": "A vmfb with flipped bytes and a recomputed hash can crash the interpreter (SIGSEGV inside IREE while "
  "registering or invoking the module): the vmfb is native code and bytecode that open() cannot verify. "
  "Inherent to loading an unauthenticated vmfb: Artifact.open(directory, digest=...) pins an artifact to "
  "the digest recorded at export and refuses every such file. test_a_pinned_digest_refuses_every_rehashed_vmfb",
  "B8": "Artifact.open hashes params.irpa from one read and parses it from a second read by path "
  "(_read_params -> ParameterIndex.load): a file swapped in between is used unverified. "
  "test_fixed_params_swapped_after_the_hash_check",
  "B9": "Artifact.params are zero-copy views into the mmapped params.irpa (_read_params: np.frombuffer on "
  "entry.file_view): a file truncated after open kills the interpreter with SIGBUS on the next read, "
  "and one rewritten in place silently changes the opened artifact's state. test_fixed_params_truncated_after_open",
  "B10": "Artifact.open reads every listed file whole before hashing it, with no size limit "
  "(_read_regular_file): a sparse 1 TiB module.mlir raises a raw MemoryError (or exhausts memory). "
  "test_fixed_huge_sparse_file",
  "B11": "A dict input with keys of mixed types raises a raw TypeError from _program.flatten_inputs "
  "(sorted keys). test_fixed_dict_input_with_mixed_keys",
  "B12": "save() lets OS errors escape raw where no directory can be made: save('.') inside an artifact "
  "(EBUSY from renameat2) and save('file/sub') (FileExistsError). test_fixed_save_onto_unsaveable_paths",
  "B13": "Type-lax manifest fields: target.demote_f64 accepts 0/1 and format_version accepts 2.0 "
  "(compared with ==/in, so 0 == False). test_fixed_type_lax_manifest_fields",
  "B14": "Design gap: well-formed, consistent edits of what no other file records (a function's output "
  "structure, a key's key_impl, a variable's type) change what callers get: permuting the leaves of a "
  "two-output function swaps its outputs. Only a signature over the manifest can catch these. "
  "test_fixed_output_structure_permuted",
  "B16": "Artifact.open raises a raw NotADirectoryError when a folder on a listed file's path is a regular file "
  "(a file named spirv where spirv/x.spv is listed): _read_regular_file catches only FileNotFoundError. "
  "test_fixed_folder_that_is_a_file",
  "B17": "save(overwrite=True) onto a FIFO hangs forever: after the swap the FIFO sits at the temporary's name and "
  "_files.save_directory's cleanup, shutil.rmtree(tmp), opens it for reading; and a FIFO named like a stale "
  "temporary (.<name>.tmp-<dead pid>-x) next to the target makes every later save hang the same way in "
  "remove_stale_temporaries. test_fixed_save_hangs_on_a_fifo",
  "B15": "Artifact.open reads the files by path, not through one directory handle: a save that swaps the "
  "directory between two reads makes open() refuse ('corrupt or was changed') where _files.py promises "
  "readers the old or the new artifact, whole. test_fixed_open_during_a_save",
}

# Every bug above is fixed but B7, which is inherent to running native code (see its test): an attack that
# hits a fixed one again counts as a regression ("wrong"), and fails the summary test.
OPEN_BUGS = {"B7"}

# A raw exception escaping the library is a known bug when its type and the innermost library frame match.
# "*" matches any exception type: IREE maps its status codes to many (IndexError for OUT_OF_RANGE,
# NotImplementedError for UNIMPLEMENTED, RuntimeError for a reflection string nanobind cannot decode, ...).
# Every bug listed is fixed (but B7, a crash): a match is a regression, booked as wrong. The functions must
# exist (test_known_raw_names_functions_that_exist), so that a regression is recognized as one.
KNOWN_RAW = [
  ("TypeError", "_fields.py", "one_of", "", "B1"),
  ("*", "_variables.py", "nnx_state", "", "B2"),
  ("*", "_variables.py", "rebuild", "", "B2"),
  ("*", "_program.py", "update", "", "B2"),
  *(("*", "_device.py", function, "", "B5") for function in ("__init__", "invoke")),
  *(("*", "_params.py", function, "", "B6") for function in ("read_params", "archive_entries")),
  *(("*", "_module_check.py", function, "", "B6") for function in ("check_module", "_check_declaration")),
  ("MemoryError", "_files.py", "_read_at", "", "B10"),
  ("NotADirectoryError", "_files.py", "_read_at", "", "B16"),
  ("TypeError", "_program.py", "flatten_inputs", "", "B11"),
  *(
    (kind, "_files.py", function, "", "B12")
    for kind, function in (("OSError", "_exchange"), ("FileExistsError", "save_directory"))
  ),
]


# The ledger: one row per attack.


@dataclasses.dataclass
class Row:
  family: str
  attack: str
  outcome: str
  detail: str = ""
  bug: str | None = None


class Ledger:
  def __init__(self):
    self.rows: list[Row] = []

  def add(self, family: str, attack: str, outcome: str, detail: str = "", bug: str | None = None) -> Row:
    assert family in FAMILIES and outcome in OUTCOMES, (family, outcome)
    row = Row(family, attack, outcome, detail, bug)
    self.rebook(row, outcome, detail, bug)
    self.rows.append(row)
    return row

  @staticmethod
  def rebook(row: Row, outcome: str, detail: str, bug: str | None = None) -> None:
    """Changes a row's outcome, under the same rule as ``add``: a fixed bug that came back is a regression."""
    assert outcome in OUTCOMES, outcome
    if outcome == "known_bug" and bug not in OPEN_BUGS:
      outcome, detail = "wrong", f"regression of {bug}, which was fixed: {detail}"
    row.outcome, row.detail, row.bug = outcome, detail[:400], bug

  def counts(self) -> dict:
    result = {}
    for family, title in FAMILIES.items():
      rows = [r for r in self.rows if r.family == family]
      counts = {"title": title, "attacks": len(rows), **{o: sum(r.outcome == o for r in rows) for o in OUTCOMES}}
      counts["known_bugs"] = {b: sum(r.bug == b for r in rows) for b in sorted({r.bug for r in rows if r.bug})}
      result[family] = counts
    return result


LEDGER = Ledger()
NOTES: dict = {}  # facts the summary reports beside the counts


@contextlib.contextmanager
def attacks_of_this_test():
  """Fails the test if any attack recorded inside ends in an unexplained outcome."""
  start = len(LEDGER.rows)
  yield
  rows = LEDGER.rows[start:]
  assert rows, "no attack was recorded"
  bad = [r for r in rows if r.outcome in UNEXPLAINED]
  assert not bad, f"{len(bad)} of {len(rows)} attacks not refused or handled:\n" + "\n".join(
    f"  [{r.outcome}] {r.attack}: {r.detail}" for r in bad[:25]
  )


def library_frame(error: BaseException) -> tuple[str, str, str] | None:
  """(file, function, source line) of the innermost frame of compile/ the exception passed through."""
  for frame in reversed(traceback.extract_tb(error.__traceback__)):
    path = pathlib.Path(frame.filename).resolve()
    if path.is_relative_to(LIBRARY):
      return path.name, frame.name, frame.line or ""
  return None


def known_raw(type_name: str, frame) -> str | None:
  if frame is None:
    return None
  file, function, line = frame
  for kind, known_file, known_function, text, bug in KNOWN_RAW:
    if kind in ("*", type_name) and file == known_file and function == known_function and text in line:
      return bug
  return None


def judge(family: str, attack: str, act, check=None, *, wrong_bug: str | None = None) -> Row:
  """Runs ``act()``; an NnxMetalError is a refusal, ``check(result)`` returns what is wrong with a result (or None)."""
  try:
    result = act()
  except nnxc.NnxMetalError as e:
    return LEDGER.add(family, attack, "refused", f"{type(e).__name__}: {e}")
  except Exception as e:  # noqa: BLE001 - anything else escaping the library is what this module looks for
    frame = library_frame(e)
    bug = known_raw(type(e).__name__, frame)
    detail = f"{type(e).__name__}: {e} (at {frame[0]}:{frame[1]})" if frame else f"{type(e).__name__}: {e}"
    return LEDGER.add(family, attack, "known_bug" if bug else "raw", detail, bug)
  problem = check(result) if check else None
  if problem:
    return LEDGER.add(family, attack, "known_bug" if wrong_bug else "wrong", problem, wrong_bug)
  return LEDGER.add(family, attack, "handled")


# Observing a program: everything a caller can get, compared bit for bit.


def flat_state(state) -> list:
  leaves = []
  for path, variable in nnx.to_flat_state(state):
    value = variable.get_value()
    kind = str(getattr(value, "dtype", type(value).__name__))  # key<fry> for a typed key, else the dtype
    if jax.dtypes.issubdtype(getattr(value, "dtype", None), jax.dtypes.prng_key):
      value = jax.random.key_data(value)
    leaves.append((tuple(path), type(variable).__name__, kind, np.asarray(value)))
  return leaves


def observe(directory, calls, *, state: bool = True) -> dict:
  """Loads the artifact and makes the ``calls`` [(function, args)], then reads its arrays (and state)."""
  program = nnxc.load_program(directory)
  outputs = [getattr(program, name)(*args) if name in program.functions else "no such function" for name, args in calls]
  seen = {"outputs": outputs, "arrays": program.arrays()}
  if state:
    seen["state"] = flat_state(program.state())
  return seen


def differences(expected, got, where: str = "") -> str | None:
  if type(expected) is not type(got):
    return f"{where or 'result'}: a {type(got).__name__} instead of a {type(expected).__name__}"
  if isinstance(expected, np.ndarray):
    if (expected.dtype, expected.shape, expected.tobytes()) != (got.dtype, got.shape, got.tobytes()):
      return (
        f"{where}: {got.dtype}{list(got.shape)} {got.ravel()[:3]} instead of "
        f"{expected.dtype}{list(expected.shape)} {expected.ravel()[:3]}"
      )
    return None
  if isinstance(expected, dict):
    if set(expected) != set(got):
      return f"{where}: keys {sorted(set(got) - set(expected))[:3]} instead of {sorted(set(expected) - set(got))[:3]}"
    items = [(expected[k], got[k], f"{where}.{k}") for k in expected]
  elif isinstance(expected, list | tuple):
    if len(expected) != len(got):
      return f"{where}: {len(got)} items instead of {len(expected)}"
    items = [(a, b, f"{where}[{i}]") for i, (a, b) in enumerate(zip(expected, got, strict=True))]
  else:
    return None if expected == got else f"{where}: {got!r} instead of {expected!r}"
  for a, b, w in items:
    problem = differences(a, b, w)
    if problem:
      return problem
  return None


def sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def saved(artifact_or_program, directory: pathlib.Path, **options) -> pathlib.Path:
  """Saves an artifact or a program into ``directory`` and returns the directory."""
  artifact_or_program.save(directory, **options)
  return pathlib.Path(directory)


def edit_manifest(directory: pathlib.Path, edit) -> None:
  manifest = json.loads((directory / "manifest.json").read_text())
  edit(manifest)
  (directory / "manifest.json").write_text(json.dumps(manifest))


def rehash(directory: pathlib.Path, *names: str) -> None:
  """What an attacker does after changing a file: recompute its hash in the manifest."""
  edit_manifest(directory, lambda m: m["files"].update({n: sha256((directory / n).read_bytes()) for n in names}))


def fresh_copy(source: pathlib.Path, directory: pathlib.Path) -> pathlib.Path:
  if directory.is_symlink() or directory.is_file():
    directory.unlink()
  shutil.rmtree(directory, ignore_errors=True)
  shutil.copytree(source, directory, symlinks=True)
  return directory


def snapshot(root: pathlib.Path) -> dict:
  """Every entry under ``root`` (links not followed): kind and content, to check nothing was touched."""
  entries = {}
  for folder, dirs, files in os.walk(root):
    for name in dirs + files:
      path = pathlib.Path(folder) / name
      mode = os.lstat(path).st_mode
      if stat.S_ISLNK(mode):
        entries[str(path.relative_to(root))] = ("link", os.readlink(path))
      elif stat.S_ISREG(mode):
        entries[str(path.relative_to(root))] = ("file", path.read_bytes())
      else:
        entries[str(path.relative_to(root))] = ("dir" if stat.S_ISDIR(mode) else "other", None)
  return entries


# Audit hook: the paths the library's Python code opens, renames, removes or creates.

_AUDITED = {
  "open",
  "os.rename",
  "os.remove",
  "os.rmdir",
  "os.mkdir",
  "os.symlink",
  "os.link",
  "os.truncate",
  "os.chmod",
  "os.utime",
  "os.listdir",
  "os.scandir",
  "shutil.rmtree",
  "shutil.copyfile",
  "shutil.move",
}
_AUDIT: dict = {"installed": False, "active": False, "paths": []}


def _audit_hook(event, args):
  if _AUDIT["active"] and event in _AUDITED:
    for arg in args[:2]:
      if isinstance(arg, str | bytes | os.PathLike):
        _AUDIT["paths"].append((event, os.path.abspath(os.fsdecode(arg))))


@contextlib.contextmanager
def audited():
  if not _AUDIT["installed"]:
    sys.addaudithook(_audit_hook)
    _AUDIT["installed"] = True
  _AUDIT["paths"] = []
  _AUDIT["active"] = True
  try:
    yield _AUDIT["paths"]
  finally:
    _AUDIT["active"] = False


def touched_outside(paths: list, forbidden: list[pathlib.Path]) -> list:
  forbidden = [os.path.abspath(p) for p in forbidden]
  return [(e, p) for e, p in paths if any(p == f or p.startswith(f + os.sep) for f in forbidden)]


@contextlib.contextmanager
def fifo_watchdog(root: pathlib.Path, seconds: float = 5):
  """Yields {'hung': bool}; after ``seconds`` unblocks anything stuck opening a FIFO under ``root`` (by opening each
  for writing) and marks the attempt as hung: a reader blocked on a FIFO would otherwise wait forever."""
  state = {"hung": False}
  done = threading.Event()

  def watch():
    if done.wait(seconds):
      return
    state["hung"] = True
    while not done.is_set():
      for folder, dirs, files in os.walk(root):
        for name in dirs + files:
          path = os.path.join(folder, name)
          with contextlib.suppress(OSError):
            if stat.S_ISFIFO(os.lstat(path).st_mode):
              os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
      done.wait(0.2)

  thread = threading.Thread(target=watch, daemon=True)
  thread.start()
  try:
    yield state
  finally:
    done.set()
    thread.join()


# Crash isolation: cases run in a child process that is restarted after the case that killed it.

CHILD = textwrap.dedent(
  """
  import hashlib, json, pathlib, shutil, sys, traceback
  import numpy as np
  import compile as nnxc

  plan = json.loads(pathlib.Path(sys.argv[1]).read_text())
  log = open(sys.argv[2], "a")
  start = int(sys.argv[3])
  source, work = pathlib.Path(plan["source"]), pathlib.Path(plan["work"])
  x = np.load(plan["x"])
  originals = {name: (source / name).read_bytes() for name in plan["files"]}

  def observe(directory):
    program = nnxc.load_program(directory)
    arrays = program.arrays()
    return [np.asarray(program.eval(x))] + [arrays[k] for k in sorted(arrays)]

  def frame(error):
    for f in reversed(traceback.extract_tb(error.__traceback__)):
      if "/compile/" in f.filename:
        return [pathlib.Path(f.filename).name, f.name, f.line or ""]
    return None

  reference = observe(source)
  for i in range(start, len(plan["cases"])):
    case = plan["cases"][i]
    log.write(json.dumps({"i": i, "event": "start"}) + "\\n")
    log.flush()
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(source, work)
    data = bytearray(originals[case["file"]])
    if case["op"] == "flip":
      data[case["offset"]] ^= case["mask"]
    elif case["op"] == "truncate":
      del data[case["length"]:]
    elif case["op"] == "replace":
      data = bytearray(bytes.fromhex(case["data"]))
    (work / case["file"]).write_bytes(bytes(data))
    if case["rehash"]:
      manifest = json.loads((work / "manifest.json").read_text())
      manifest["files"][case["file"]] = hashlib.sha256(bytes(data)).hexdigest()
      (work / "manifest.json").write_text(json.dumps(manifest))
    result = {"i": i, "event": "end"}
    try:
      got = observe(work)
      same = len(got) == len(reference) and all(
        (a.dtype, a.shape, a.tobytes()) == (b.dtype, b.shape, b.tobytes()) for a, b in zip(got, reference)
      )
      result["outcome"] = "same" if same else "different"
    except nnxc.NnxMetalError as e:
      result.update(outcome="refused", detail=f"{type(e).__name__}: {e}"[:300])
    except Exception as e:
      result.update(outcome="raw", type=type(e).__name__, frame=frame(e), detail=f"{type(e).__name__}: {e}"[:300])
    log.write(json.dumps(result) + "\\n")
    log.flush()
  """
)


def run_isolated(tmp: pathlib.Path, source: pathlib.Path, x: np.ndarray, cases: list[dict]) -> list[dict]:
  """Runs tampering ``cases`` on copies of ``source`` in child processes; a case that kills its child is 'crashed'."""
  tmp.mkdir(parents=True, exist_ok=True)
  np.save(tmp / "x.npy", x)
  plan = {
    "source": str(source),
    "work": str(tmp / "work"),
    "x": str(tmp / "x.npy"),
    "files": sorted({c["file"] for c in cases}),
    "cases": cases,
  }
  (tmp / "plan.json").write_text(json.dumps(plan))
  (tmp / "child.py").write_text(CHILD)
  log = tmp / "log.jsonl"
  results: dict[int, dict] = {}
  start = 0
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  while start < len(cases):
    try:
      process = subprocess.run(
        [sys.executable, str(tmp / "child.py"), str(tmp / "plan.json"), str(log), str(start)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
      )
      returncode, stderr = process.returncode, process.stderr
    except subprocess.TimeoutExpired as e:
      returncode, stderr = "hung", str(e.stderr)[-300:]
    started = ended = -1
    for line in log.read_text().splitlines():
      event = json.loads(line)
      if event["event"] == "start":
        started = max(started, event["i"])
      else:
        results[event["i"]] = event
        ended = max(ended, event["i"])
    if returncode == 0:
      break
    if started < start or started == ended:
      raise AssertionError(f"the tampering child failed outside any case (exit {returncode}):\n{stderr[-2000:]}")
    how = f"killed by {signal.Signals(-returncode).name}" if isinstance(returncode, int) and returncode < 0 else ""
    results[started] = {"outcome": "crashed", "detail": how or f"exit {returncode}: {stderr[-300:]}"}
    start = started + 1
  assert len(results) == len(cases), f"{len(results)} results for {len(cases)} cases"
  return [results[i] for i in range(len(cases))]


def record_isolated(family: str, attack: str, result: dict, *, different: str, crash_bug: str | None = None) -> Row:
  """Books one child result; ``different`` says what an accepted, changed result is: 'handled', 'wrong' or a bug."""
  outcome = result["outcome"]
  if outcome == "refused":
    return LEDGER.add(family, attack, "refused", result["detail"])
  if outcome == "same":
    return LEDGER.add(family, attack, "handled")
  if outcome == "different":
    if different in ("handled", "wrong"):
      return LEDGER.add(family, attack, different, "accepted with other values")
    return LEDGER.add(family, attack, "known_bug", "accepted with other values", different)
  if outcome == "crashed":
    return LEDGER.add(family, attack, "known_bug" if crash_bug else "crashed", result["detail"], crash_bug)
  bug = known_raw(result["type"], result["frame"])
  return LEDGER.add(family, attack, "known_bug" if bug else "raw", f"{result['detail']} at {result['frame']}", bug)


# The artifacts under attack, exported once per module.


def _export(model, functions, target="cpu") -> nnxc.Artifact:
  return nnxc.export(model, functions, target=target)


@dataclasses.dataclass
class Subject:
  """A saved artifact, the calls that exercise it, and what they return on the untouched artifact."""

  directory: pathlib.Path
  calls: list
  reference: dict


def _subject(directory: pathlib.Path, calls: list) -> Subject:
  return Subject(directory, calls, observe(directory, calls))


@pytest.fixture(scope="module")
def x() -> np.ndarray:
  return np.asarray(ZOO["mlp"].example_args(BATCH, 2)[0])


@pytest.fixture(scope="module")
def mlp(tmp_path_factory, x) -> Subject:
  """The MLP (BatchNorm, Dropout key and count) with train and eval, trained once: its state is not the initial one."""
  args = ZOO["mlp"].example_args(BATCH, 0)
  functions = {mode: nnxc.method("__call__", *args, mode=mode) for mode in ("train", "eval")}
  program = _export(ZOO["mlp"].make(0), functions).load()
  program.train(*ZOO["mlp"].example_args(BATCH, 1))
  directory = saved(program, tmp_path_factory.mktemp("mlp") / "mlp")
  return _subject(directory, [("eval", (x,)), ("train", (x,)), ("eval", (x,))])


def _counter_artifact(target: str) -> nnxc.Artifact:
  return _export(ZOO["counter"].make(0), {"train": nnxc.method("__call__", mode="train")}, target)


@pytest.fixture(scope="module")
def counter_artifact() -> nnxc.Artifact:
  return _counter_artifact("cpu")


@pytest.fixture(scope="module")
def vulkan_counter_artifact() -> nnxc.Artifact:
  require_device("vulkan")
  return _counter_artifact("vulkan")


@pytest.fixture(scope="module")
def negative_counter(tmp_path_factory, counter_artifact) -> Subject:
  """The counter holding -3: a value whose bytes read differently as uint32."""
  program = counter_artifact.load()
  program.set_arrays({"count": np.array(-3, np.int32)})
  directory = saved(program, tmp_path_factory.mktemp("counter") / "counter")
  return _subject(directory, [("train", ()), ("train", ())])


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Subject:
  """A linear layer exporting a two-output tuple and a two-key dict: the outputs have the same shape and dtype."""
  args = ZOO["linear"].example_args(BATCH, 0)
  functions = {
    "pair": nnxc.function(lambda m, x: (m(x), m(x) + m(x)), *args),
    "named": nnxc.function(lambda m, x: {"a": m(x), "b": m(x) + m(x)}, *args),
  }
  directory = saved(_export(ZOO["linear"].make(0), functions), tmp_path_factory.mktemp("pair") / "pair")
  x = np.asarray(ZOO["linear"].example_args(BATCH, 3)[0])
  return _subject(directory, [("pair", (x,)), ("named", (x,))])


# 1. Manifest field fuzzing: every field deleted, retyped, set to extremes; unknown fields added.

NAN, INF = float("nan"), float("inf")


def _deep_list(depth: int):
  value = 0
  for _ in range(depth):
    value = [value]
  return value


def _deep_object(depth: int):
  value = {}
  for _ in range(depth):
    value = {"a": value}
  return value


REPLACEMENTS = [
  ("null", None),
  ("true", True),
  ("false", False),
  ("zero", 0),
  ("-1", -1),
  ("1.5", 1.5),
  ("2**64", 2**64),
  ("-2**63", -(2**63)),
  ("1e308", 1e308),
  ("NaN", NAN),
  ("inf", INF),
  ("-inf", -INF),
  ("empty string", ""),
  ("100k string", "x" * 100_000),
  ("V100000", "V100000"),
  ("object", "object"),
  ("empty list", []),
  ("empty object", {}),
  ("list nested 60 deep", _deep_list(60)),
  ("object nested 60 deep", _deep_object(60)),
]
SHAPES = [[-1], [2**40], [2**40 + 1], [2**63], [0], [1] * 65, [2**20, 2**20, 2**20], [1.0], ["4"], [True], [None]]
DTYPE_NAMES = ["V100000", "object", "float128", "<f4", ">f4", "f4", "str", "int4", "float32 ", "FLOAT32", "void", "O"]
KEY_RENAMES = ["", "zz_unknown", "__class__", "nnx_get_state", "save", "../x", "x" * 5000]
# Fields whose schema takes more than one JSON type: a type change there is not malformed.
MULTI_TYPED = {"objects", "method", "mode", "key_impl", "metadata", "path"}
# Fields no file of the artifact records: a consistent edit there is the B14 design gap, not a misread.
UNVERIFIABLE = {"structure", "key_impl", "variable_type", "variable_class"}


def where_of(path) -> str:
  """A JSON path as the library's error messages name it: ``state[3].shape[0]``, ``functions.eval.inputs``."""
  text = ""
  for part in path:
    text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
  return text


def json_paths(node, path=()):
  yield path
  if isinstance(node, dict):
    for key, value in node.items():
      yield from json_paths(value, (*path, key))
  elif isinstance(node, list):
    for i, value in enumerate(node):
      yield from json_paths(value, (*path, i))


def _get(document, path):
  for part in path:
    document = document[part]
  return document


def _kind(value) -> str:
  if isinstance(value, bool) or value is None:
    return repr(value) if value is None else "bool"
  if isinstance(value, int | float):
    return "number"
  return type(value).__name__


def manifest_mutants(document: dict):
  """(attack, mutated document, path, replacement) for every field of ``document``."""
  for path in json_paths(document):
    original = _get(document, path)
    name = where_of(path) or "the document"
    values = list(REPLACEMENTS) + [("tripled", [original] * 3), ("as a string", json.dumps(original)[:200])]
    if path and path[-1] == "shape":
      values += [(f"shape {str(s)[:30]}", s) for s in SHAPES]
    if path and path[-1] in ("dtype", "device_dtype"):
      values += [(f"dtype {d!r}", d) for d in DTYPE_NAMES]
    for label, value in values if path else []:
      mutant = json.loads(json.dumps(document))
      _get(mutant, path[:-1])[path[-1]] = value
      yield f"{name} = {label}", mutant, path, value
    if isinstance(original, dict):
      mutant = json.loads(json.dumps(document))
      _get(mutant, path)["zz_unknown"] = 1
      yield f"{name}: unknown field added", mutant, (*path, "zz_unknown"), None
      for key in original:
        mutant = json.loads(json.dumps(document))
        del _get(mutant, path)[key]
        yield f"{where_of((*path, key))} deleted", mutant, (*path, key), None
        for new_key in KEY_RENAMES:
          if new_key not in original:
            mutant = json.loads(json.dumps(document))
            parent = _get(mutant, path)
            parent[new_key] = parent.pop(key)
            yield f"{where_of((*path, key))} key renamed {new_key[:20]!r}", mutant, (*path, key), None
    if isinstance(original, list) and original:
      for label, edit in [("emptied", lambda v: v.clear()), ("last dropped", lambda v: v.pop())]:
        mutant = json.loads(json.dumps(document))
        edit(_get(mutant, path))
        yield f"{name} {label}", mutant, path, None


def names_the_field(message: str, path) -> bool:
  """Whether a refusal names the edited field, one of its parents, or the field it contradicts."""
  if not path:
    return True
  if path[0] in ("format", "format_version"):
    return "format" in message
  if any(where_of(path[:k]) in message for k in range(1, len(path) + 1)):
    return True
  return re.search(r"manifest\.json: [\w.$\[\]-]+ (is|must|has|does|names)", message) is not None


def manifest_attack(family: str, attack: str, text: str, path, work: pathlib.Path, subject: Subject, **kw) -> Row:
  """Parses a mutated manifest; if the parser takes it, opens, loads and uses the artifact and compares everything."""
  try:
    Manifest.from_json(text)
  except nnxc.ArtifactError as e:
    if not names_the_field(str(e), path):
      return LEDGER.add(family, attack, "wrong", f"refused without naming {where_of(path)}: {e}")
    return LEDGER.add(family, attack, "refused", f"ArtifactError: {e}")
  except Exception as e:  # noqa: BLE001
    frame = library_frame(e)
    bug = known_raw(type(e).__name__, frame)
    return LEDGER.add(family, attack, "known_bug" if bug else "raw", f"{type(e).__name__}: {e} at {frame}", bug)
  (work / "manifest.json").write_text(text)
  return judge(family, attack, lambda: observe(work, subject.calls), lambda s: differences(subject.reference, s), **kw)


def _wrong_bug_for(path, replacement, original) -> str | None:
  """The known bug an accepted, wrong-result edit of ``path`` belongs to (None: none, it must not happen)."""
  field = next((p for p in reversed(path) if isinstance(p, str)), "")
  if field in ("name", "path") or (len(path) >= 3 and path[-2] == "path"):
    return "B3"
  if field in ("dtype", "device_dtype"):
    return "B4"
  if field in UNVERIFIABLE or "structure" in path:
    return "B14"
  if "metadata" in path:
    return "B2"
  return None


def test_manifest_field_fuzzing(mlp, tmp_path):
  """Every field of a real manifest: deleted, retyped, extreme values, unknown dtypes, deep nesting, unknown fields."""
  work = fresh_copy(mlp.directory, tmp_path / "work")
  document = json.loads((mlp.directory / "manifest.json").read_text())
  with attacks_of_this_test():
    for attack, mutant, path, value in manifest_mutants(document):
      text = json.dumps(mutant)
      original = _get(document, path) if path and _has(document, path) else None
      row = manifest_attack("manifest", attack, text, path, work, mlp, wrong_bug=_wrong_bug_for(path, value, original))
      field = next((p for p in reversed(path) if isinstance(p, str)), "")
      retyped = path and _has(document, path) and value is not None and _kind(value) != _kind(original)
      if row.outcome == "handled" and retyped and field not in MULTI_TYPED and "metadata" not in path:
        LEDGER.rebook(row, "known_bug", f"accepted a {_kind(value)} for a {_kind(original)}", "B13")


def _has(document, path) -> bool:
  try:
    _get(document, path)
    return True
  except (KeyError, IndexError, TypeError):
    return False


def _random_json(rng: random.Random, depth: int = 0):
  kind = rng.randrange(9 if depth < 4 else 6)
  if kind == 0:
    return None
  if kind == 1:
    return rng.random() < 0.5
  if kind == 2:
    return rng.choice([0, 1, -1, 2**31, 2**53 + 1, -(2**70), rng.randrange(-1000, 1000)])
  if kind == 3:
    return rng.choice([0.0, -0.0, 1e-320, 3.5, NAN, INF, -INF, 1e300])
  if kind in (4, 5):
    alphabet = "abcxyz019_.$-/\\:\u00e9\u2025\x00\ud7ff\U0001f600 "
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
  if kind == 6:
    return [_random_json(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
  if kind == 7:
    return {_random_json_key(rng): _random_json(rng, depth + 1) for _ in range(rng.randrange(0, 4))}
  return rng.choice(["float32", "uint32", "int32", "bfloat16", "leaf", "tuple", "none", "module.vmfb"])


def _random_json_key(rng: random.Random) -> str:
  return rng.choice(["leaf", "tuple", "dict", "none", "name", "shape", "dtype", "a", "", "zz"])


def test_manifest_random_values(mlp, tmp_path):
  """Seeded random JSON (numbers, strings with NUL and surrogates, nested objects) at random fields."""
  work = fresh_copy(mlp.directory, tmp_path / "work")
  document = json.loads((mlp.directory / "manifest.json").read_text())
  paths = [p for p in json_paths(document) if p]
  rng = random.Random(20260509)
  with attacks_of_this_test():
    for i in range(400):
      path = rng.choice(paths)
      value = _random_json(rng)
      mutant = json.loads(json.dumps(document))
      _get(mutant, path[:-1])[path[-1]] = value
      row = manifest_attack(
        "manifest",
        f"random #{i}: {where_of(path)} = {json.dumps(value)[:40]}",
        json.dumps(mutant),
        path,
        work,
        mlp,
        wrong_bug=_wrong_bug_for(path, value, _get(document, path)),
      )
      field = next((p for p in reversed(path) if isinstance(p, str)), "")
      retyped = _kind(value) != _kind(_get(document, path))
      if row.outcome == "handled" and retyped and field not in MULTI_TYPED and "metadata" not in path:
        LEDGER.rebook(row, "known_bug", f"accepted a {_kind(value)}", "B13")


def test_whole_manifest_documents(mlp, tmp_path):
  """Not a manifest at all: empty, other JSON types, other encodings, garbage, 65 MB, duplicate keys, comments."""
  work = fresh_copy(mlp.directory, tmp_path / "work")
  text = (mlp.directory / "manifest.json").read_text()
  documents = [
    ("empty file", b""),
    ("null", b"null"),
    ("a list", b"[]"),
    ("a string", b'"nnx-metal-artifact"'),
    ("a number", b"2"),
    ("UTF-8 BOM", b"\xef\xbb\xbf" + text.encode()),
    ("UTF-16", text.encode("utf-16")),
    ("invalid UTF-8", text.encode()[:50] + b"\xff\xfe" + text.encode()[50:]),
    ("trailing garbage", text.encode() + b"}"),
    ("a comment", b"// nnx\n" + text.encode()),
    ("truncated", text.encode()[: len(text) // 2]),
    ("NUL bytes", text.encode().replace(b"{", b"{\x00", 1)),
    (
      "duplicate format key",
      text.replace('"format": "nnx-metal-artifact"', '"format": "x", "format": "nnx-metal-artifact"', 1).encode(),
    ),
    *(
      (
        f"format version {label}",
        text.replace(f'"format_version": {FORMAT_VERSION}', f'"format_version": {v}').encode(),
      )
      for label, v in [
        (FORMAT_VERSION - 1, FORMAT_VERSION - 1),
        (FORMAT_VERSION + 1, FORMAT_VERSION + 1),
        (f"'{FORMAT_VERSION}'", f'"{FORMAT_VERSION}"'),
        (f"{FORMAT_VERSION}.0", f"{FORMAT_VERSION}.0"),
      ]
    ),
    ("another format", text.replace("nnx-metal-artifact", "nnx-metal-artifactX").encode()),
    ("list nested 100000 deep", b"[" * 100_000 + b"]" * 100_000),
    ("object nested 100000 deep", b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
  ]
  with attacks_of_this_test():
    for attack, data in documents:
      (work / "manifest.json").write_bytes(data)
      judge(
        "manifest", f"document: {attack}", lambda: observe(work, mlp.calls), lambda s: differences(mlp.reference, s)
      )
    # Larger than the 64 MiB limit (sparse: nothing is written), and JSON nested deeper than the C stack allows.
    with open(work / "manifest.json", "wb") as f:
      f.truncate(65 << 20)
    judge("manifest", "document: 65 MiB (sparse)", lambda: observe(work, mlp.calls))
    deep = tmp_path / "deep"
    fresh_copy(mlp.directory, deep)
    (deep / "manifest.json").write_bytes(b"[" * 3_000_000 + b"]" * 3_000_000)
    script = (
      f"import compile\ntry:\n  compile.Artifact.open({str(deep)!r})\nexcept compile.ArtifactError:\n  print('refused')"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    outcome = "refused" if result.returncode == 0 and "refused" in result.stdout else "crashed"
    LEDGER.add("manifest", "document: list nested 3 million deep (child process)", outcome, result.stderr[-300:])


def test_variable_classes_are_never_imported(mlp, tmp_path, monkeypatch):
  """A manifest naming os:system, pickle:loads, builtins:eval ... as a Variable class: nothing is imported or run."""
  work = tmp_path / "work"
  monkeypatch.chdir(tmp_path)
  canary = tmp_path / CANARY_NAME
  payload = f"touch {canary}"
  classes = [
    ("os:system", "system"),
    ("pickle:loads", "loads"),
    ("builtins:eval", "eval"),
    ("builtins:exec", "exec"),
    ("subprocess:getoutput", "getoutput"),
    ("subprocess:Popen", "Popen"),
    ("importlib:import_module", "import_module"),
    ("ctypes:CDLL", "CDLL"),
    ("shutil:rmtree", "rmtree"),
    ("posix:system", "system"),
    ("antigravity:geohash", "geohash"),
    ("this:s", "s"),
    (f"os:system({payload!r})", "system"),
    ("__main__:Count", "Count"),
    ("nnx_models._linear:Count.__init__.__globals__", "Count"),
    ("flax.nnx:Param", "Param"),  # a real Variable class, but not under the name it is known by
  ]
  importable = {"antigravity", "this"}
  with attacks_of_this_test():
    for cls, type_name in classes:
      for index in (1, 4):

        def edit(m, cls=cls, index=index, type_name=type_name):
          m["state"][index].update(variable_class=cls, variable_type=type_name, metadata={"command": payload})

        fresh_copy(mlp.directory, work)
        edit_manifest(work, edit)
        for use in ("state", "saved_state", "load_state"):

          def act(use=use):
            if use == "state":
              return nnxc.load_program(work).state()
            if use == "saved_state":
              return nnxc.Artifact.open(work).saved_state()
            return nnxc.load_program(work).load_state(ZOO["mlp"].make(0))

          before = set(sys.modules)
          row = judge(
            "manifest", f"variable_class {cls!r} of state[{index}] ({use})", act, lambda _: "a State was built"
          )
          if canary.exists() or (set(sys.modules) - before) & importable:
            LEDGER.rebook(row, "wrong", "code was executed or a module imported")
  assert not canary.exists()


# 2. Swapped or edited state entries and input/output specs: refused at open or first use, never misread.


def _state_groups(document) -> list[list[int]]:
  groups: dict = {}
  for i, entry in enumerate(document["state"]):
    groups.setdefault((tuple(entry["shape"]), entry["dtype"]), []).append(i)
  return [g for g in groups.values() if len(g) > 1]


def _shape_edits(shape: list) -> list:
  edits = [("one more dimension", [*shape, 1]), ("doubled", [2 * d for d in shape] or [2]), ("size 0", [0, *shape[1:]])]
  if shape:
    edits += [("last dimension dropped", shape[:-1]), ("scalar", [])]
  if len(shape) == 2 and shape[0] != shape[1]:
    edits.append(("transposed (same size)", shape[::-1]))
  return edits


def state_and_spec_edits(document: dict):
  """(attack, mutated document, known wrong-result bug)."""

  def mutant(edit):
    copy = json.loads(json.dumps(document))
    edit(copy)
    return copy

  state = document["state"]
  for group in _state_groups(document):
    for a, b in [(a, b) for i, a in enumerate(group) for b in group[i + 1 :]]:
      names = f"{state[a]['name']} and {state[b]['name']}"

      def swap(m, a=a, b=b, keys=None):
        if keys is None:
          m["state"][a], m["state"][b] = m["state"][b], m["state"][a]
        else:
          for key in keys:
            m["state"][a][key], m["state"][b][key] = m["state"][b][key], m["state"][a][key]

      yield f"state: {names} swapped in the list", mutant(swap), None
      yield f"state: globals of {names} swapped", mutant(lambda m, a=a, b=b: swap(m, a, b, ["global"])), None
      yield (
        f"state: names and paths of {names} swapped",
        mutant(lambda m, a=a, b=b: swap(m, a, b, ["name", "path"])),
        "B3",
      )
      everything = ["name", "path", "variable_type", "variable_class", "metadata", "key_impl"]
      yield (
        f"state: all but the globals of {names} swapped",
        mutant(lambda m, a=a, b=b, e=everything: swap(m, a, b, e)),
        "B3",
      )
  for i, entry in enumerate(state):
    name = entry["name"]

    def set_field(m, i=i, **fields):
      m["state"][i].update(fields)

    yield (
      f"state: {name} renamed",
      mutant(lambda m, i=i: set_field(m, i, name="renamed.x", path=["renamed", "x"])),
      "B3",
    )
    yield f"state: {name} path edited", mutant(lambda m, i=i: set_field(m, i, path=["renamed", "x"])), None
    yield f"state: {name} global edited", mutant(lambda m, i=i: set_field(m, i, **{"global": "zz"})), None
    other = state[(i + 1) % len(state)]["global"]
    yield (
      f"state: {name} global set to {other}'s",
      mutant(lambda m, i=i, o=other: set_field(m, i, **{"global": o})),
      None,
    )
    for dtype in _dtypes.DTYPES:
      if dtype != entry["dtype"]:
        edit = {"dtype": dtype, "device_dtype": dtype}
        yield (
          f"state: {name} dtype {entry['dtype']} -> {dtype}",
          mutant(lambda m, i=i, e=edit: set_field(m, i, **e)),
          "B4",
        )
    yield f"state: {name} device_dtype float64", mutant(lambda m, i=i: set_field(m, i, device_dtype="float64")), None
    for label, shape in _shape_edits(entry["shape"]):
      yield f"state: {name} shape {label}", mutant(lambda m, i=i, s=shape: set_field(m, i, shape=s)), None
  for function, spec in document["functions"].items():
    for side in ("inputs", "outputs"):
      for k, tensor in enumerate(spec[side]):
        where = f"{function}.{side}[{k}]"

        def set_tensor(m, f=function, s=side, k=k, **fields):
          m["functions"][f][s][k].update(fields)

        for dtype in _dtypes.DTYPES:
          if dtype != tensor["dtype"]:
            edit = {"dtype": dtype, "device_dtype": dtype}
            yield f"spec: {where} dtype -> {dtype}", mutant(lambda m, e=edit, st=set_tensor: st(m, **e)), "B4"
        for label, shape in _shape_edits(tensor["shape"]):
          yield f"spec: {where} shape {label}", mutant(lambda m, s=shape, st=set_tensor: st(m, shape=s)), None
        yield f"spec: {where} renamed", mutant(lambda m, st=set_tensor: st(m, name="renamed")), None
      yield (
        f"spec: {function}.{side} duplicated",
        mutant(lambda m, f=function, s=side: m["functions"][f][s].extend(m["functions"][f][s])),
        None,
      )
      yield f"spec: {function}.{side} emptied", mutant(lambda m, f=function, s=side: m["functions"][f][s].clear()), None
    yield f"spec: {function}.updates emptied", mutant(lambda m, f=function: m["functions"][f]["updates"].clear()), None
    yield (
      f"spec: {function}.updates all",
      mutant(lambda m, f=function: m["functions"][f].update(updates=[e["name"] for e in state])),
      None,
    )
  functions = list(document["functions"])
  if len(functions) == 2:
    a, b = functions
    yield (
      "spec: function specs swapped",
      mutant(lambda m: m.update(functions={a: m["functions"][b], b: m["functions"][a]})),
      None,
    )
    yield "spec: a function dropped", mutant(lambda m: m["functions"].pop(b)), None
    yield "spec: a function renamed", mutant(lambda m: m["functions"].update(extra=m["functions"].pop(b))), None


def test_swapped_and_edited_state_entries_and_specs(mlp, negative_counter, tmp_path):
  """Same-shape entries swapped, dtypes, shapes, globals and paths edited, input/output specs edited."""
  with attacks_of_this_test():
    for subject in (mlp, negative_counter):
      work = fresh_copy(subject.directory, tmp_path / subject.directory.name)
      document = json.loads((subject.directory / "manifest.json").read_text())
      for attack, mutant, bug in state_and_spec_edits(document):
        manifest_attack(
          "state", f"{subject.directory.name}: {attack}", json.dumps(mutant), (), work, subject, wrong_bug=bug
        )


def test_output_structure_and_descriptions_edited(pair, mlp, tmp_path):
  """Structure, key_impl and variable types: edits no file contradicts (B14), besides structures that are malformed."""
  document = json.loads((pair.directory / "manifest.json").read_text())
  work = fresh_copy(pair.directory, tmp_path / "pair")
  leaf = [{"leaf": 0}, {"leaf": 1}]
  structures = [
    ("pair", "leaves permuted", {"tuple": leaf[::-1]}, "B14"),
    ("pair", "tuple made a list", {"list": leaf}, "B14"),
    ("named", "keys swapped", {"dict": [["a", leaf[1]], ["b", leaf[0]]]}, "B14"),
    ("pair", "one leaf twice", {"tuple": [leaf[0], leaf[0]]}, None),
    ("pair", "a leaf missing", {"tuple": [leaf[0]]}, None),
    ("pair", "leaf 2 of 2", {"tuple": [leaf[0], {"leaf": 2}]}, None),
    ("pair", "leaf -1", {"tuple": [leaf[0], {"leaf": -1}]}, None),
    ("pair", "33 deep", _nest({"tuple": leaf}, 33), None),
    ("pair", "32 deep", _nest({"tuple": leaf}, 31), "B14"),
    ("pair", "unknown kind", {"set": leaf}, None),
    ("pair", "two kinds", {"tuple": leaf, "list": leaf}, None),
    ("named", "dict pair of three", {"dict": [["a", leaf[0], 1], ["b", leaf[1]]]}, None),
    ("named", "dict key not a string", {"dict": [[1, leaf[0]], ["b", leaf[1]]]}, None),
    ("pair", "none with content", {"none": 1}, None),
  ]
  with attacks_of_this_test():
    for function, label, structure, bug in structures:
      mutant = json.loads(json.dumps(document))
      mutant["functions"][function]["structure"] = structure
      manifest_attack("state", f"structure of {function}: {label}", json.dumps(mutant), (), work, pair, wrong_bug=bug)
    document = json.loads((mlp.directory / "manifest.json").read_text())
    work = fresh_copy(mlp.directory, tmp_path / "mlp")
    key = next(i for i, v in enumerate(document["state"]) if v["key_impl"])
    param = next(i for i, v in enumerate(document["state"]) if v["variable_type"] == "Param")
    stat_ = next(i for i, v in enumerate(document["state"]) if v["variable_type"] == "BatchStat")
    edits = [
      (f"state[{key}].key_impl null", key, {"key_impl": None}, "B14"),
      (f"state[{key}].key_impl rbg (needs 4 words)", key, {"key_impl": "rbg"}, None),
      (f"state[{key}].key_impl unsafe_rbg", key, {"key_impl": "unsafe_rbg"}, None),
      (f"state[{param}].key_impl on a float", param, {"key_impl": "threefry2x32"}, None),
      (
        f"state[{stat_}] typed Param",
        stat_,
        {k: document["state"][param][k] for k in ("variable_type", "variable_class")},
        "B14",
      ),
      (
        f"state[{param}] typed BatchStat",
        param,
        {k: document["state"][stat_][k] for k in ("variable_type", "variable_class")},
        "B14",
      ),
      (f"state[{param}] type name not its class", param, {"variable_type": "BatchStat"}, None),
    ]
    for label, index, fields, bug in edits:
      mutant = json.loads(json.dumps(document))
      mutant["state"][index].update(fields)
      manifest_attack("state", label, json.dumps(mutant), (), work, mlp, wrong_bug=bug)


def _nest(structure: dict, depth: int) -> dict:
  for _ in range(depth):
    structure = {"tuple": [structure]}
  return structure


# 3. File tampering: bytes flipped and files truncated, with and without the attacker recomputing the hashes.


def _flip_cases(file: str, size: int, count: int, seed: int, *, rehash: bool, limit: int | None = None) -> list:
  rng = random.Random(seed)
  return [
    {
      "file": file,
      "op": "flip",
      "offset": rng.randrange(min(size, limit or size)),
      "mask": 1 << rng.randrange(8),
      "rehash": rehash,
    }
    for _ in range(count)
  ]


def _truncations(file: str, size: int, *, rehash: bool) -> list:
  lengths = sorted({0, 1, 8, 64, 512, size // 2, size - 64, size - 1} - {size})
  return [{"file": file, "op": "truncate", "length": n, "rehash": rehash} for n in lengths if 0 <= n < size]


def _apply(directory: pathlib.Path, case: dict) -> None:
  path = directory / case["file"]
  data = bytearray(path.read_bytes())
  if case["op"] == "flip":
    data[case["offset"]] ^= case["mask"]
  elif case["op"] == "truncate":
    del data[case["length"] :]
  elif case["op"] == "append":
    data += b"\x00" * case["length"]
  path.write_bytes(bytes(data))
  if case["rehash"]:
    rehash(directory, case["file"])


def _describe(case: dict) -> str:
  how = {
    "flip": f"bit {case.get('mask')} flipped at {case.get('offset')}",
    "truncate": f"truncated to {case.get('length')}",
  }
  return f"{case['file']} {how.get(case['op'], case['op'])}{' (rehashed)' if case['rehash'] else ''}"


def _without_state(reference: dict) -> dict:
  return {k: v for k, v in reference.items() if k != "state"}


def _judge_tampered(subject, work, cases, check=None) -> None:
  """Each case applied to a fresh copy of ``subject``'s artifact, judged (``check``: what is wrong with a run)."""
  for case in cases:
    fresh_copy(subject.directory, work)
    _apply(work, case)
    judge(
      "tamper",
      f"{subject.directory.name}: {_describe(case)}",
      lambda w=work, s=subject: observe(w, s.calls, state=False),
      check,
    )


def test_tampered_files_are_refused_by_their_hash(mlp, tmp_path, request):
  """Every file of a cpu and a vulkan artifact: flipped bits, truncations and appended bytes, hashes left alone."""
  vulkan = _vulkan_subject(request, tmp_path)
  with attacks_of_this_test():
    for subject in [mlp] + ([vulkan] if vulkan else []):
      work = tmp_path / f"work-{subject.directory.name}"
      files = [p.relative_to(subject.directory).as_posix() for p in subject.directory.rglob("*") if p.is_file()]
      for i, file in enumerate(sorted(f for f in files if f != "manifest.json")):
        size = (subject.directory / file).stat().st_size
        cases = _flip_cases(file, size, 12 if "/" not in file else 3, i, rehash=False) + _truncations(
          file, size, rehash=False
        )
        cases.append({"file": file, "op": "append", "length": 16, "rehash": False})
        _judge_tampered(subject, work, cases)


def test_tampered_descriptive_files_with_recomputed_hashes(mlp, tmp_path, request):
  """module.mlir and spirv/*.spv are never executed: flipped and rehashed, the program must run exactly as before."""
  vulkan = _vulkan_subject(request, tmp_path)
  with attacks_of_this_test():
    for subject in [mlp] + ([vulkan] if vulkan else []):
      work = tmp_path / f"work-{subject.directory.name}"
      files = [
        p.relative_to(subject.directory).as_posix()
        for p in subject.directory.rglob("*")
        if p.suffix in (".mlir", ".spv")
      ]
      for i, file in enumerate(sorted(files)):
        size = (subject.directory / file).stat().st_size
        cases = _flip_cases(file, size, 6, 100 + i, rehash=True) + _truncations(file, size, rehash=True)[:3]
        _judge_tampered(subject, work, cases, lambda seen, s=subject: differences(_without_state(s.reference), seen))


def test_rehashed_params_archives(mlp, x, tmp_path):
  """params.irpa with flipped bits and truncations and a recomputed hash, in child processes: refused, or the
  archive's own values (the attacker may write any values), never a crash."""
  size = (mlp.directory / "params.irpa").stat().st_size
  header = _flip_cases("params.irpa", size, 120, 7, rehash=True, limit=1024)
  cases = header + _flip_cases("params.irpa", size, 30, 8, rehash=True) + _truncations("params.irpa", size, rehash=True)
  with attacks_of_this_test():
    for case, result in zip(cases, run_isolated(tmp_path, mlp.directory, x, cases), strict=True):
      record_isolated("tamper", f"mlp: {_describe(case)}", result, different="handled")


def test_rehashed_vmfb_truncations(mlp, x, tmp_path):
  """A truncated module.vmfb with a recomputed hash, in child processes: refused, never a crash."""
  size = (mlp.directory / "module.vmfb").stat().st_size
  cases = _truncations("module.vmfb", size, rehash=True)
  with attacks_of_this_test():
    for case, result in zip(cases, run_isolated(tmp_path, mlp.directory, x, cases), strict=True):
      record_isolated("tamper", f"mlp: {_describe(case)}", result, different="wrong")


@pytest.fixture(scope="module")
def others(tmp_path_factory):
  """Artifacts of other models and exports, to mix their files into the MLP's."""
  root = tmp_path_factory.mktemp("others")
  mlp_args = ZOO["mlp"].example_args(BATCH, 0)
  eight = ZOO["mlp"].example_args(2 * BATCH, 0)
  linear_args = ZOO["linear"].example_args(BATCH, 0)
  made = {
    "linear": _export(ZOO["linear"].make(0), {"eval": nnxc.method("__call__", *linear_args)}),
    "mlp seed 1": _export(
      ZOO["mlp"].make(1), {m: nnxc.method("__call__", *mlp_args, mode=m) for m in ("train", "eval")}
    ),
    "mlp batch 8": _export(ZOO["mlp"].make(0), {m: nnxc.method("__call__", *eight, mode=m) for m in ("train", "eval")}),
    "mlp eval only": _export(ZOO["mlp"].make(0), {"eval": nnxc.method("__call__", *mlp_args, mode="eval")}),
    "linear 3x5": _export(
      Linear(3, 5, rngs=nnx.Rngs(0)), {"eval": nnxc.method("__call__", np.ones((BATCH, 3), np.float32))}
    ),
    "twin of linear (other state names)": _export(_Twin(), {"eval": nnxc.method("__call__", *linear_args)}),
  }
  return {name: saved(artifact, root / name.replace(" ", "_").replace(",", "")) for name, artifact in made.items()}


class _Twin(nnx.Module):
  """Linear's state types in Linear's order, under other names: a module whose only difference is the state order."""

  def __init__(self):
    self.a = nnx.Param(np.zeros((5,), np.float32))
    self.z = nnx.Param(np.ones((2, 5), np.float32))

  def __call__(self, x):
    return x @ self.z + self.a


def _observe_or_none(make_directory, calls):
  """What a legitimate artifact gives for ``calls``, or None where the library itself refuses to build or run it."""
  try:
    return observe(make_directory(), calls)
  except nnxc.NnxMetalError:
    return None


def test_files_from_other_exports_with_recomputed_hashes(mlp, others, tmp_path):
  """A vmfb or params.irpa of another model or export, the manifest's hash recomputed: the cross-checks catch it.
  Where the files do fit (the same model's archive with other values), the result must be what the library itself
  builds from them (``Artifact.with_params``)."""
  linear = _subject(others["linear"], [("eval", (np.asarray(ZOO["linear"].example_args(BATCH, 3)[0]),))])
  with attacks_of_this_test():
    for target, subject in (("mlp", mlp), ("linear", linear)):
      for name, other in others.items():
        if other == subject.directory:
          continue
        for file in ("module.vmfb", "params.irpa"):
          # This artifact with the other export's file.
          if file == "params.irpa":
            fit = _observe_or_none(
              lambda s=subject, o=other: saved(
                nnxc.Artifact.open(s.directory).with_params(nnxc.Artifact.open(o).params),
                tmp_path / "legit",
                overwrite=True,
              ),
              subject.calls,
            )
          else:  # the vmfb of the same export (another seed) computes the same functions of the state
            fit = subject.reference if _same_export(subject.directory, other) else None
          _judge_transplant(
            other / file, subject.directory, tmp_path, subject.calls, fit, f"{target}: {file} of {name}"
          )
          # The other export's manifest and files, with this artifact's file.
          if file == "params.irpa":
            fit = _observe_or_none(
              lambda s=subject, o=other: saved(
                nnxc.Artifact.open(o).with_params(nnxc.Artifact.open(s.directory).params),
                tmp_path / "legit",
                overwrite=True,
              ),
              subject.calls,
            )
          else:
            fit = _observe_or_none(lambda o=other: o, subject.calls) if _same_export(subject.directory, other) else None
          attack = f"{target}: its {file} under the manifest of {name}"
          _judge_transplant(subject.directory / file, other, tmp_path, subject.calls, fit, attack)


def _judge_transplant(file: pathlib.Path, into: pathlib.Path, tmp_path, calls, fit, attack: str) -> None:
  """``file`` copied into a copy of the artifact ``into`` and rehashed: refused, or it runs as ``fit`` (None: unfit)."""
  work = fresh_copy(into, tmp_path / "work")
  shutil.copy(file, work / file.name)
  rehash(work, file.name)
  judge(
    "tamper",
    f"{attack} (rehashed)",
    lambda: observe(work, calls),
    lambda seen: "accepted files that do not fit" if fit is None else differences(fit, seen),
  )


def _same_export(a: pathlib.Path, b: pathlib.Path) -> bool:
  """Whether two artifacts export the same functions of the same state for the same target (seeds aside)."""
  ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
  return all(ma[k] == mb[k] for k in ("target", "state", "functions", "graphdef_fingerprint"))


def test_rehashed_vmfb_of_another_target(mlp, vulkan_counter_artifact, counter_artifact, tmp_path):
  """A vulkan vmfb in a cpu artifact and a cpu artifact whose manifest claims vulkan: refused, not raw (B5)."""
  cpu = saved(counter_artifact, tmp_path / "cpu")
  vulkan = saved(vulkan_counter_artifact, tmp_path / "vulkan")
  with attacks_of_this_test():
    work = fresh_copy(cpu, tmp_path / "work")
    shutil.copy(vulkan / "module.vmfb", work / "module.vmfb")
    rehash(work, "module.vmfb")
    judge("tamper", "counter: the vulkan vmfb in the cpu artifact (rehashed)", lambda: observe(work, [("train", ())]))
    work = fresh_copy(cpu, tmp_path / "work")
    target = {"name": "vulkan", "backend": "vulkan-spirv", "drivers": ["vulkan"], "demote_f64": True}
    edit_manifest(work, lambda m: m.update(target=target))
    judge("tamper", "counter: cpu artifact whose manifest says vulkan", lambda: observe(work, [("train", ())]))
    work = fresh_copy(vulkan, tmp_path / "work")
    shutil.copy(cpu / "module.vmfb", work / "module.vmfb")
    rehash(work, "module.vmfb")
    judge("tamper", "counter: the cpu vmfb in the vulkan artifact (rehashed)", lambda: observe(work, [("train", ())]))


# 4. Path traversal and links: nothing outside the artifact directory is read or written.

HOSTILE_NAMES = [
  "../outside/x",
  "../../outside/x",
  "/etc/passwd",
  "{outside}/x",
  "msl/../../outside/x.metal",
  "spirv/../../outside/x.spv",
  "spirv/../manifest.json",
  "msl/../module.vmfb",
  "./module.vmfb",
  "module.vmfb/.",
  "module.vmfb/",
  "spirv//a.spv",
  "spirv/./a.spv",
  "spirv/a.spv/../../../outside/x",
  "msl/a.metal\x00.txt",
  "..\\outside\\x",
  "msl\\..\\..\\outside\\x.metal",
  "spirv/a.SPV",
  "msl/a.metal.txt",
  "MODULE.VMFB",
  " module.vmfb",
  "module.vmfb ",
  "~/x",
  "$HOME/x",
  "msl/%2e%2e/x.metal",
  "msl/\u2025/x.metal",
  "spirv/a/b.spv",
  "msl/",
  "spirv/.spv",
  "",
  "manifest.json",
  "outside",
  "/",
  "//etc/passwd",
]


@pytest.fixture
def outside(tmp_path) -> pathlib.Path:
  """Files an attacker wants read or overwritten: outside the artifact, with the names the attacks use."""
  root = tmp_path / "outside"
  root.mkdir()
  for name in ("x", "x.metal", "x.spv", "module.vmfb", "params.irpa", "manifest.json", "keep.txt"):
    (root / name).write_bytes(b"secret " + name.encode())
  return root


def test_hostile_file_names_in_the_manifest(mlp, outside, tmp_path):
  """Names with .., absolute paths, backslashes, NULs, odd case and spaces: refused, and nothing outside is touched."""
  before = snapshot(outside)
  with attacks_of_this_test():
    for name in HOSTILE_NAMES:
      name = name.replace("{outside}", str(outside))
      for how in ("added", "replacing module.vmfb"):
        work = fresh_copy(mlp.directory, tmp_path / "art")
        digest = sha256(b"secret x")

        def edit(m, name=name, how=how, digest=digest):
          if how == "replacing module.vmfb":
            m["files"][name] = m["files"].pop("module.vmfb")
          else:
            m["files"][name] = digest

        edit_manifest(work, edit)
        with audited() as paths:
          row = judge("paths", f"file name {name!r} {how}", lambda w=work: observe(w, mlp.calls))
        touched = touched_outside(paths, [outside, pathlib.Path("/etc/passwd")])
        if touched:
          LEDGER.rebook(row, "wrong", f"touched {touched[:3]}")
    assert snapshot(outside) == before


def _make_fifo(path: pathlib.Path) -> None:
  os.mkfifo(path)


def _make_socket(path: pathlib.Path) -> None:
  # A socket's path holds at most 107 bytes, fewer than pytest's temporary paths under xdist: bind it relative
  # to its folder.
  sock, here = socket.socket(socket.AF_UNIX), os.getcwd()
  try:
    os.chdir(path.parent)
    sock.bind(path.name)
  finally:
    os.chdir(here)
    sock.close()


def _vulkan_subject(request, tmp_path) -> Subject | None:
  """The vulkan counter as a subject, or None where this machine has no vulkan device."""
  try:
    artifact = request.getfixturevalue("vulkan_counter_artifact")
  except pytest.skip.Exception:
    return None
  return _subject(saved(artifact, tmp_path / "vulkan"), [("train", ()), ("train", ())])


def test_links_fifos_and_folders_in_the_artifact(mlp, outside, tmp_path, request):
  """Files and folders replaced by symbolic links to identical copies outside, FIFOs, sockets and directories."""
  vulkan = _vulkan_subject(request, tmp_path)
  subjects = [mlp] + ([vulkan] if vulkan else [])
  copies = tmp_path / "copies"
  cases = []
  for subject in subjects:
    files = ["manifest.json", "module.vmfb", "params.irpa", "module.mlir"]
    files += sorted(p.relative_to(subject.directory).as_posix() for p in subject.directory.glob("spirv/*"))[:1]
    for file in files:
      for how, label in [
        ("link", "a link to an identical copy outside"),
        ("devzero", "a link to /dev/zero"),
        ("hardlink", "a hard link to an identical copy outside"),
        ("fifo", "a FIFO"),
        ("socket", "a socket"),
        ("dir", "a directory"),
        ("dangling", "a dangling link"),
      ]:
        cases.append((subject, f"{file} {label}", file, how))
  if vulkan:
    for how, label in [("link", "a link to an identical copy outside"), ("file", "a file"), ("remove", "removed")]:
      cases.append((vulkan, f"spirv/ {label}", "spirv", how))
  before = snapshot(outside)
  with attacks_of_this_test():
    for subject, attack, file, how in cases:
      work = fresh_copy(subject.directory, tmp_path / "art")
      target = work / file
      copy = copies / subject.directory.name / file
      copy.parent.mkdir(parents=True, exist_ok=True)
      if not copy.exists():
        shutil.copytree(target, copy) if target.is_dir() else shutil.copy(target, copy)
      shutil.rmtree(target) if target.is_dir() else target.unlink()
      if how == "link":
        target.symlink_to(copy)
      elif how == "devzero":
        target.symlink_to("/dev/zero")
      elif how == "hardlink":
        os.link(copy, target)
      elif how == "fifo":
        _make_fifo(target)
      elif how == "socket":
        _make_socket(target)
      elif how == "dir":
        target.mkdir()
      elif how == "dangling":
        target.symlink_to(outside / "missing")
      elif how == "file":
        target.write_bytes(b"")
      # A hard link is the directory's own file: it must open and run exactly as the original.
      check = (lambda seen, s=subject: differences(s.reference, seen)) if how == "hardlink" else (lambda _: "accepted")
      with audited() as paths, fifo_watchdog(work) as watch:
        row = judge(
          "paths", f"{subject.directory.name}: {attack}", lambda w=work, s=subject: observe(w, s.calls), check
        )
      if watch["hung"]:
        LEDGER.rebook(row, "crashed", "hung on a FIFO")
      if how in ("link", "devzero", "dangling") and row.outcome == "handled":
        LEDGER.rebook(row, "wrong", "a symbolic link was followed")
      touched = touched_outside(paths, [outside, copies] if how != "hardlink" else [outside])
      if touched:
        LEDGER.rebook(row, "wrong", f"touched {touched[:3]}")
  assert snapshot(outside) == before


def test_artifact_directory_reached_through_links(mlp, outside, tmp_path):
  """The artifact directory itself a link, unlisted links inside it: opened, and only its own files are read."""
  with attacks_of_this_test():
    link = tmp_path / "link"
    link.symlink_to(mlp.directory)
    judge(
      "paths",
      "the artifact directory is a symbolic link",
      lambda: observe(link, mlp.calls),
      lambda s: differences(mlp.reference, s),
    )
    work = fresh_copy(mlp.directory, tmp_path / "art")
    (work / "evil").symlink_to(outside)
    (work / "etc").symlink_to("/etc")
    (work / "msl").symlink_to(outside)
    (work / "spirv").mkdir()
    (work / "spirv" / "x.spv").symlink_to(outside / "x.spv")
    with audited() as paths:
      row = judge(
        "paths",
        "unlisted links inside the artifact",
        lambda: observe(work, mlp.calls),
        lambda s: differences(mlp.reference, s),
      )
    if touched_outside(paths, [outside]):
      LEDGER.rebook(row, "wrong", f"touched {touched_outside(paths, [outside])[:3]}")


# 5. Saving: refuses to replace what is not an artifact, swaps atomically, survives kills and concurrency.


def _setup(kind: str, path: pathlib.Path, outside: pathlib.Path, artifact_dir: pathlib.Path) -> None:
  if kind == "non-artifact directory":
    path.mkdir()
    (path / "keep.txt").write_text("user data")
  elif kind == "regular file":
    path.write_text("user data")
  elif kind == "link to an artifact elsewhere":
    shutil.copytree(artifact_dir, outside / f"artifact-{path.parent.name}")
    path.symlink_to(outside / f"artifact-{path.parent.name}")
  elif kind == "link to a non-artifact directory":
    path.symlink_to(outside)
  elif kind == "dangling link":
    path.symlink_to(outside / "missing")
  elif kind == "FIFO":
    os.mkfifo(path)
  elif kind == "directory whose manifest is a link to an artifact's":
    path.mkdir()
    (path / "manifest.json").symlink_to(artifact_dir / "manifest.json")
    (path / "keep.txt").write_text("user data")
  elif kind == "directory whose manifest is a directory":
    (path / "manifest.json").mkdir(parents=True)
  elif kind == "directory whose manifest is a FIFO":
    path.mkdir()
    os.mkfifo(path / "manifest.json")
  elif kind == "directory whose manifest is not JSON":
    path.mkdir()
    (path / "manifest.json").write_text("{ not json")
  elif kind == "existing artifact":
    shutil.copytree(artifact_dir, path)
  elif kind == "existing artifact with a folder linked outside":
    shutil.copytree(artifact_dir, path)
    (path / "spirv").symlink_to(outside)
  elif kind == "an artifact of an old format version":
    shutil.copytree(artifact_dir, path)
    edit_manifest(path, lambda m: m.update(format_version=1))


SAVE_TARGETS = [
  ("non-artifact directory", "refuse"),
  ("regular file", "refuse"),
  ("link to an artifact elsewhere", "refuse"),
  ("link to a non-artifact directory", "refuse"),
  ("dangling link", "refuse"),
  ("FIFO", "refuse"),
  ("directory whose manifest is a link to an artifact's", "refuse"),
  ("directory whose manifest is a directory", "refuse"),
  ("directory whose manifest is a FIFO", "refuse"),
  ("directory whose manifest is not JSON", "refuse"),
  ("existing artifact", "replace"),
  ("existing artifact with a folder linked outside", "replace"),
  ("an artifact of an old format version", "replace"),
]


def test_save_onto_what_is_there(mlp, outside, tmp_path):
  """Without overwrite only an artifact is replaced; with it anything is; link targets outside are never touched."""
  artifact = nnxc.Artifact.open(mlp.directory)
  with attacks_of_this_test():
    for kind, expected in SAVE_TARGETS:
      for overwrite in (False, True):
        root = tmp_path / f"case-{kind.replace(' ', '_')}-{overwrite}"
        root.mkdir()
        path = root / "target"
        _setup(kind, path, outside, mlp.directory)
        before_outside = snapshot(outside)
        before = snapshot(root)
        attack = f"save onto a {kind} (overwrite={overwrite})"

        def act(path=path, overwrite=overwrite):
          artifact.save(path, overwrite=overwrite)
          return observe(path, mlp.calls)

        with audited() as paths, fifo_watchdog(root) as watch:
          row = judge("saving", attack, act, lambda s: differences(mlp.reference, s))
        if watch["hung"]:
          LEDGER.rebook(row, *(("known_bug", "hung", "B17") if "FIFO" in kind else ("crashed", "hung")))
          continue
        problems = []
        if row.outcome == "refused" and snapshot(root) != before:
          problems.append("a refused save changed the directory")
        if row.outcome == "handled" and expected == "refuse" and not overwrite:
          problems.append("replaced something that is not an artifact without overwrite=True")
        if row.outcome == "refused" and (expected == "replace" or overwrite):
          problems.append("refused a save it should make")
        if snapshot(outside) != before_outside or touched_outside(paths, [outside]):
          problems.append("touched a link's target outside")
        if [p.name for p in root.iterdir() if p.name.startswith(".")]:
          problems.append(f"left temporaries {[p.name for p in root.iterdir()]}")
        if problems:
          LEDGER.rebook(row, "wrong", "; ".join(problems))


def test_save_with_hostile_file_names(mlp, outside, tmp_path):
  """An in-memory artifact whose files are named ../x, /abs, msl/../../x.metal: nothing is written anywhere."""
  artifact = nnxc.Artifact.open(mlp.directory)
  before = snapshot(outside)
  with attacks_of_this_test():
    for name in HOSTILE_NAMES:
      name = name.replace("{outside}", str(outside))
      if name in ("module.vmfb", "module.mlir"):
        continue
      evil = nnxc.Artifact(artifact.manifest, {**artifact.files, name: b"pwned"}, artifact.params)
      root = tmp_path / "save-root"
      shutil.rmtree(root, ignore_errors=True)
      root.mkdir()
      with audited() as paths:
        row = judge("saving", f"save a file named {name!r}", lambda e=evil, r=root: e.save(r / "art"))
      leftovers = sorted(p.name for p in root.iterdir())
      if row.outcome == "handled" or leftovers or touched_outside(paths, [outside]) or snapshot(outside) != before:
        LEDGER.rebook(row, "wrong", f"wrote {leftovers} / touched outside")
  assert snapshot(outside) == before


def test_stale_temporaries_are_removed_only_when_stale(mlp, outside, tmp_path):
  """Temporaries of dead saves (marked as such) are removed; those of live processes, of other targets, links named
  like temporaries and their targets are left alone."""
  artifact = nnxc.Artifact.open(mlp.directory)
  dead_pid = int(
    subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
  )
  root = tmp_path / "root"
  root.mkdir()
  stale = root / f".art.tmp-{dead_pid}-abc123"
  stale.mkdir()
  (stale / "junk").write_text("half a save")
  (stale / _files.MARKER).write_text("art")  # what a killed save leaves: its temporary, marked
  live = root / f".art.tmp-{os.getpid()}-live01"
  live.mkdir()
  linked = root / f".art.tmp-{dead_pid}-link01"
  linked.symlink_to(outside)
  foreign = root / f".other.tmp-{dead_pid}-abc123"
  foreign.mkdir()
  before = snapshot(outside)
  with attacks_of_this_test():
    row = judge(
      "saving", "save next to stale, live, linked and foreign temporaries", lambda: artifact.save(root / "art")
    )
    left = {p.name for p in root.iterdir()}
    if (
      not {"art", live.name, foreign.name} <= left
      or stale.name in left
      or left - {"art", live.name, foreign.name, linked.name}
    ):
      LEDGER.rebook(row, "wrong", f"left {sorted(left)}")
    if snapshot(outside) != before:
      LEDGER.rebook(row, "wrong", "followed a link named like a temporary")
    fifo = root / f".art.tmp-{dead_pid}-fifo01"
    os.mkfifo(fifo)
    with fifo_watchdog(root) as watch:
      row = judge("saving", "save next to a FIFO named like a stale temporary", lambda: artifact.save(root / "art"))
    if watch["hung"]:
      LEDGER.rebook(row, "known_bug", "hung", "B17")


SAVER = textwrap.dedent(
  """
  import sys
  from compile.runtime import Artifact
  source, target, times = sys.argv[1], sys.argv[2], int(sys.argv[3])
  artifact = Artifact.open(source)
  print("ready", flush=True)
  sys.stdin.readline()
  for _ in range(times):
    artifact.save(target)
  print("saved", flush=True)
  """
)

READER = textwrap.dedent(
  """
  import json, pathlib, sys
  import compile
  target, stop, values = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), set(json.loads(sys.argv[3]))
  seen = {"whole": 0, "wrong": [], "refused": [], "raw": []}
  print("ready", flush=True)
  sys.stdin.readline()
  while not stop.exists():
    try:
      artifact = compile.Artifact.open(target)
      count = int(artifact.params["count"])
      if count in values:
        seen["whole"] += 1
      else:
        seen["wrong"].append(count)
    except compile.NnxMetalError as e:
      seen["refused"].append(str(e)[:200])
    except Exception as e:
      seen["raw"].append(f"{type(e).__name__}: {e}"[:200])
  print(json.dumps(seen), flush=True)
  """
)


def _counter_with(counter_artifact, value: int, directory: pathlib.Path) -> pathlib.Path:
  return saved(counter_artifact.with_params({"count": np.array(value, np.int32)}), directory)


def test_concurrent_saves_from_several_processes(counter_artifact, tmp_path):
  """4 processes save 10 times each into one directory while a fifth opens it in a loop."""
  values = [1000 + k for k in range(4)]
  sources = [_counter_with(counter_artifact, v, tmp_path / f"source{v}") for v in values]
  target = tmp_path / "shared" / "art"
  _counter_with(counter_artifact, values[0], target)
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  stop = tmp_path / "stop"

  def start(*argv):
    process = subprocess.Popen(
      [sys.executable, *argv],
      cwd=REPO,
      env=env,
      text=True,
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
    )
    assert process.stdout.readline().strip() == "ready", process.stderr.read()
    return process

  (tmp_path / "saver.py").write_text(SAVER)
  (tmp_path / "reader.py").write_text(READER)
  savers = [start(str(tmp_path / "saver.py"), str(s), str(target), "10") for s in sources]
  reader = start(str(tmp_path / "reader.py"), str(target), str(stop), json.dumps(values))
  for process in [*savers, reader]:
    process.stdin.write("go\n")
    process.stdin.flush()
  with attacks_of_this_test():
    for k, process in enumerate(savers):
      out, err = process.communicate(timeout=120)
      outcome = (
        "handled" if process.returncode == 0 and "saved" in out else ("crashed" if process.returncode < 0 else "raw")
      )
      LEDGER.add("saving", f"concurrent saver {k}: 10 saves into the shared directory", outcome, err[-300:])
    stop.write_text("")
    out, err = reader.communicate(timeout=120)
    seen = json.loads(out.splitlines()[-1])
    detail = f"{seen['whole']} whole opens, {len(seen['refused'])} refused: {seen['refused'][:1]}"
    NOTES["opens by a reader during the concurrent saves"] = (
      f"{seen['whole']} whole, {len(seen['refused'])} refused (B15)"
    )
    if seen["wrong"] or seen["raw"]:
      LEDGER.add(
        "saving", "a reader opening the directory during the saves", "wrong", f"{seen['wrong'][:3]} {seen['raw'][:3]}"
      )
    else:
      LEDGER.add(
        "saving",
        "a reader opening the directory during the saves",
        "known_bug" if seen["refused"] else "handled",
        detail,
        "B15" if seen["refused"] else None,
      )
    judge(
      "saving",
      "the shared directory after the concurrent saves",
      lambda: int(nnxc.Artifact.open(target).params["count"]),
      lambda count: None if count in values else f"count {count}",
    )
    left = [p.name for p in target.parent.iterdir() if p.name != "art"]
    LEDGER.add("saving", "no temporaries left by the concurrent saves", "wrong" if left else "handled", str(left))


KILLER = textwrap.dedent(
  """
  import json, os, pathlib, random, signal, sys, time
  import compile
  from compile.runtime import Artifact
  old_dir, new_dir, target = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
  trials, seed = int(sys.argv[4]), int(sys.argv[5])
  old, new = Artifact.open(old_dir), Artifact.open(new_dir)
  values = {int(old.params["count"]), int(new.params["count"])}
  old.save(target)
  rng = random.Random(seed)

  def temporaries():
    return sorted(p.name for p in target.parent.iterdir() if p.name != target.name)

  results = []
  for trial in range(trials):
    pid = os.fork()
    if pid == 0:
      try:
        while True:
          new.save(target)
          old.save(target)
      finally:
        os._exit(0)
    time.sleep(rng.uniform(0.0, 0.06))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    row = {"trial": trial, "left": temporaries()}
    try:
      count = int(Artifact.open(target).params["count"])
      row["outcome"] = "whole" if count in values else "wrong"
      row["detail"] = str(count)
    except compile.NnxMetalError as e:
      row["outcome"], row["detail"] = "refused", str(e)[:300]
    except Exception as e:
      row["outcome"], row["detail"] = "raw", f"{type(e).__name__}: {e}"[:300]
    old.save(target)
    row["after"] = temporaries()
    results.append(row)
  print(json.dumps(results))
  """
)


def test_saves_killed_at_random_moments(counter_artifact, tmp_path):
  """A child saving in a loop is SIGKILLed at seeded random moments: the directory opens whole, as the old or the
  new artifact, and the next save removes the temporaries the killed one left."""
  old = _counter_with(counter_artifact, 111, tmp_path / "old")
  new = _counter_with(counter_artifact, 222, tmp_path / "new")
  (tmp_path / "killer.py").write_text(KILLER)
  target = tmp_path / "shared" / "art"
  target.parent.mkdir()
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  command = [sys.executable, str(tmp_path / "killer.py"), str(old), str(new), str(target), "40", "7"]
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  rows = json.loads(result.stdout.splitlines()[-1])
  with attacks_of_this_test():
    for row in rows:
      attack = f"save killed at a random moment #{row['trial']}" + (
        f" (left {len(row['left'])} temporaries)" if row["left"] else ""
      )
      if row["outcome"] != "whole":
        LEDGER.add("saving", attack, "wrong", f"not whole: {row['outcome']} {row['detail']}")
      elif row["after"]:
        LEDGER.add("saving", attack, "wrong", f"the next save left {row['after']}")
      else:
        LEDGER.add("saving", attack, "handled", row["detail"])
  NOTES["kills that left temporaries (removed by the next save)"] = (
    f"{sum(bool(r['left']) for r in rows)} of {len(rows)}"
  )
  assert any(row["left"] for row in rows), "no kill left a temporary: the kills did not land inside saves"


# 6. Inputs: wrong shapes, dtypes and counts, byte orders, layouts, odd Python values, NaN.


def _unaligned(x: np.ndarray) -> np.ndarray:
  buffer = np.zeros(x.nbytes + 1, np.uint8)
  view = buffer[1:].view(x.dtype).reshape(x.shape)
  view[...] = x
  return view


def input_cases(x: np.ndarray):
  """(attack, args, expected): expected is 'refuse' or the input array the call must equal the program's result on."""
  for shape in [(), (4,), (2,), (4, 3), (3, 2), (8, 2), (4, 2, 1), (1, 4, 2), (0, 2), (4, 0), (2, 4)]:
    yield f"shape {shape}", (np.zeros(shape, np.float32),), "refuse"
  for dtype in [
    *(d for d in _dtypes.DTYPES if d != "float32"),
    "object",
    "<U3",
    "S4",
    "datetime64[s]",
    "timedelta64[s]",
    "V4",
  ]:
    with contextlib.suppress(TypeError, ValueError):
      # jax.jit's rule with x64 off, which a Program follows: float64 is taken as float32; others are refused.
      expected = np.zeros((4, 2), np.float32) if dtype == "float64" else "refuse"
      yield (
        f"dtype {dtype}",
        (np.zeros((4, 2), _dtypes.DTYPES[dtype].numpy if dtype in _dtypes.DTYPES else dtype),),
        expected,
      )
  yield "structured dtype", (np.zeros((4, 2), [("a", "<f4")]),), "refuse"
  yield "big-endian structured", (np.zeros((4, 2), [("a", ">f4")]),), "refuse"
  yield "no inputs", (), "refuse"
  yield "two inputs", (x, x), "refuse"
  yield "three inputs", (x, x, x), "refuse"
  yield "None", (None,), "refuse"
  yield "a Python float", (1.0,), "refuse"
  yield "a numpy float32 scalar", (np.float32(1),), "refuse"
  yield "a 0-d array", (np.array(1, np.float32),), "refuse"
  yield "a string", ("4x2",), "refuse"
  yield "bytes", (x.tobytes(),), "refuse"
  yield "a nested list of floats", (x.tolist(),), "refuse"
  yield "an object array of the right shape", (x.astype(object),), "refuse"
  yield "an object array holding arrays", (np.array([x, x], dtype=object),), "refuse"
  yield "a ragged object array", (np.array([[1.0, 2.0], [3.0]], dtype=object),), "refuse"
  yield "a generator", ((v for v in x),), "refuse"
  yield "a set", ({1.0, 2.0},), "refuse"
  yield "a huge Python int", (2**100,), "refuse"
  yield "a complex array", (x.astype(np.complex64),), "refuse"
  yield "float64 (taken as float32, as jax.jit does with x64 off)", (x.astype(np.float64),), x
  yield "float16 (no implicit cast)", (x.astype(np.float16),), "refuse"
  yield "a dict holding two arrays", ({"a": x, "b": x},), "refuse"
  yield "a dict with mixed key types", ({1: x, "b": x},), "refuse"
  yield "a masked array", (np.ma.masked_array(x, mask=np.zeros_like(x, bool)),), x
  yield "big-endian float32", (x.astype(">f4"),), x
  yield "little-endian float32 spelled '<f4'", (x.astype("<f4"),), x
  yield "Fortran order", (np.asfortranarray(x),), x
  yield "every other row of an (8, 2) array", (np.repeat(x, 2, axis=0)[::2],), x
  yield "negative strides", (np.ascontiguousarray(x[::-1])[::-1],), x
  yield "a transposed view", (np.ascontiguousarray(x.T).T,), x
  yield "stride 0 (broadcast)", (np.broadcast_to(x[:1], (4, 2)),), np.broadcast_to(x[:1], (4, 2)).copy()
  yield "unaligned memory", (_unaligned(x),), x
  yield "read-only", (_readonly(x),), x
  yield "a np.matrix", (np.matrix(x),), x
  yield "a jax array", (jax.numpy.asarray(x),), x
  yield "a tuple holding the array", ((x,),), x
  yield "a list holding the array", ([x],), x
  yield "a dict holding the array", ({"x": x},), x
  yield "nested containers with a None", ([{"x": (x, None)}],), x
  yield "a memoryview", (memoryview(x),), x
  special = x.copy()
  special[0] = [np.nan, np.inf]
  special[1] = [-np.inf, -0.0]
  special[2] = [1e-45, np.finfo(np.float32).max]
  yield "NaN, inf, -inf, -0, subnormal, max", (special,), special
  yield "all NaN", (np.full((4, 2), np.nan, np.float32),), np.full((4, 2), np.nan, np.float32)
  yield (
    "NaN with a payload",
    (np.full((4, 2), 0x7FC00123, np.uint32).view(np.float32),),
    np.full((4, 2), 0x7FC00123, np.uint32).view(np.float32),
  )


def _readonly(x: np.ndarray) -> np.ndarray:
  y = x.copy()
  y.flags.writeable = False
  return y


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix, on purpose
def test_function_inputs(mlp, x):
  """Every odd input to eval: refused with SignatureError, or computed exactly as on the plain array."""
  program = nnxc.load_program(mlp.directory)
  with attacks_of_this_test():
    for attack, args, expected in input_cases(x):
      if isinstance(expected, str):
        judge("inputs", f"eval: {attack}", lambda a=args: program.eval(*a), lambda y: "accepted")
      else:
        want = program.eval(np.ascontiguousarray(expected, np.float32))
        judge("inputs", f"eval: {attack}", lambda a=args: program.eval(*a), lambda y, w=want: differences(w, y))
    # NaN in some rows: the others rows are computed as without them (eval is row-wise).
    for row_index in range(BATCH):
      poisoned = x.copy()
      poisoned[row_index] = np.nan
      clean = program.eval(x)

      def check(y, r=row_index, clean=clean):
        others = [i for i in range(BATCH) if i != r]
        if not np.array_equal(y[others], clean[others]):
          return "a NaN row changed the other rows"
        return None if np.isnan(y[r]).all() else f"row {r} not NaN: {y[r]}"

      judge("inputs", f"eval: NaN in row {row_index}", lambda p=poisoned: program.eval(p), check)


def test_random_arrays(mlp, x):
  """Seeded random arrays: dtypes, byte orders, shapes and strides; exactly the float32[4, 2] ones (and float64, taken
  as float32 as jax.jit does with x64 off) are computed."""
  program = nnxc.load_program(mlp.directory)
  rng = np.random.default_rng(20260509)
  dtypes = [np.dtype(d) for d in ("f4", ">f4", "f8", ">f8", "f2", "i4", ">i4", "u4", "i8", "u1", "?", "c8", "O")]
  with attacks_of_this_test():
    for i in range(300):
      dtype = dtypes[rng.integers(len(dtypes))]
      shape = (4, 2) if rng.random() < 0.5 else tuple(int(d) for d in rng.integers(0, 6, rng.integers(0, 4)))
      base = (
        rng.normal(size=(shape[0] * 2 if shape else 1, *shape[1:])).astype(dtype)
        if shape
        else rng.normal(size=()).astype(dtype)
      )
      array = base[::2] if shape and rng.random() < 0.5 else (base[: shape[0]] if shape else base)
      if rng.random() < 0.2:
        array = np.asfortranarray(array)
      if array.dtype.name in ("float32", "float64") and array.shape == (4, 2):  # float64 as jax.jit takes it
        want = program.eval(np.ascontiguousarray(array.astype(np.float32)))
        judge(
          "inputs",
          f"random #{i}: {dtype.str}{list(array.shape)}",
          lambda a=array: program.eval(a),
          lambda y, w=want: differences(w, y),
        )
      else:
        judge(
          "inputs",
          f"random #{i}: {dtype.str}{list(array.shape)}",
          lambda a=array: program.eval(a),
          lambda y: "accepted",
        )


def test_set_arrays_values(mlp):
  """set_arrays: wrong names, shapes, dtypes refused all-or-nothing; NaN, byte orders and layouts stored bit-exact."""
  program = nnxc.load_program(mlp.directory)
  mean = program.arrays(["bn.mean"])["bn.mean"]
  payload = np.full(16, 0x7FC00123, np.uint32).view(np.float32)
  refused = [
    ("unknown name", {"bn.nope": mean}),
    ("a non-string name", {5: mean}),
    ("wrong shape", {"bn.mean": np.zeros(15, np.float32)}),
    ("wrong dtype", {"bn.mean": mean.astype(np.float64)}),
    ("an object array", {"bn.mean": mean.astype(object)}),
    ("None", {"bn.mean": None}),
    ("a scalar", {"bn.mean": 1.0}),
    ("a list", {"bn.mean": mean.tolist()}),
    ("a good entry and a bad one", {"bn.var": mean + 1, "bn.mean": np.zeros(3, np.float32)}),
    ("a count as int32 (it is uint32)", {"dropout.rngs.count": np.array(1, np.int32)}),
    ("a key of the wrong shape", {"dropout.rngs.key": np.zeros(4, np.uint32)}),
  ]
  stored = [
    ("NaN with a payload", payload),
    ("inf and -inf", np.array([np.inf, -np.inf] * 8, np.float32)),
    ("big-endian", (mean + 2).astype(">f4")),
    ("negative strides", np.ascontiguousarray((mean + 3)[::-1])[::-1]),
    ("every other element", np.repeat(mean + 4, 2)[::2]),
    ("a jax array", jax.numpy.asarray(mean + 5)),
  ]
  with attacks_of_this_test():
    for attack, arrays in refused:
      before = program.arrays()

      def check(_, before=before):
        return "accepted"

      row = judge("inputs", f"set_arrays: {attack}", lambda a=arrays: program.set_arrays(a), check)
      if differences(before, program.arrays()):
        LEDGER.rebook(row, "wrong", "a refused set_arrays changed the state")
    for attack, value in stored:
      want = np.ascontiguousarray(np.asarray(value).astype(np.float32))
      judge(
        "inputs",
        f"set_arrays: {attack}",
        lambda v=value: (program.set_arrays({"bn.mean": v}), program.arrays(["bn.mean"])["bn.mean"])[1],
        lambda got, w=want: differences(w, got),
      )


# 7. Threads: every call counted exactly, readers never see a half-written state, outputs never mixed up.


def _hammer(workers, *, timeout: float = 240) -> list:
  errors = []

  def run(work):
    try:
      work()
    except BaseException as e:  # noqa: BLE001 - reported by the test
      errors.append(e)

  threads = [threading.Thread(target=run, args=(w,)) for w in workers]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(timeout)
  if any(t.is_alive() for t in threads):
    errors.append(TimeoutError("a thread did not finish"))
  return errors


def _thread_outcome(attack: str, errors: list, problem: str | None) -> Row:
  if errors:
    refused = all(isinstance(e, nnxc.NnxMetalError) for e in errors)
    return LEDGER.add("threads", attack, "refused" if refused else "raw", f"{len(errors)} errors: {errors[0]!r}")
  return LEDGER.add("threads", attack, "wrong" if problem else "handled", problem or "")


@pytest.mark.parametrize("target", ["cpu", "vulkan"])
def test_threads_count_every_call(target, counter_artifact, request):
  """8 threads x 500 train calls on one Program: the count is exactly 4000; then writers with readers."""
  artifact = counter_artifact if target == "cpu" else request.getfixturevalue("vulkan_counter_artifact")
  with attacks_of_this_test():
    program = artifact.load()
    start = int(program.arrays()["count"])
    errors = _hammer([lambda: [program.train() for _ in range(500)] for _ in range(8)])
    count = int(program.arrays()["count"])
    _thread_outcome(
      f"{target}: 8 threads x 500 train calls", errors, None if count == start + 4000 else f"count {count - start}"
    )

    seen: list[list[int]] = [[] for _ in range(4)]
    done = threading.Event()

    def reader(k):
      while not done.is_set():
        seen[k].append(int(program.arrays()["count"]))

    def writer():
      for _ in range(250):
        program.train()

    readers = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
    for thread in readers:
      thread.start()
    start = int(program.arrays()["count"])
    errors = _hammer([writer] * 4)
    done.set()
    for thread in readers:
      thread.join(60)
    count = int(program.arrays()["count"])
    problem = None if count == start + 1000 else f"count {count - start} after 1000 calls"
    for values in seen:
      if any(b < a for a, b in zip(values, values[1:], strict=False)) or any(v > start + 1000 for v in values):
        problem = f"a reader saw the count go back or overshoot: {values[:10]}"
    _thread_outcome(f"{target}: 4 writer threads x 250 calls with 4 reader threads", errors, problem)


def test_threads_readers_never_see_half_a_set_arrays(mlp):
  """Writers set bn.mean and bn.var together to one value per call; readers must always see an equal, uniform pair."""
  program = nnxc.load_program(mlp.directory)
  torn = []
  done = threading.Event()

  def writer(k):
    for i in range(200):
      value = np.full(16, k * 1000 + i, np.float32)
      program.set_arrays({"bn.mean": value, "bn.var": value})

  def reader():
    while not done.is_set():
      pair = program.arrays(["bn.mean", "bn.var"])
      mean, var = pair["bn.mean"], pair["bn.var"]
      if not (np.all(mean == mean[0]) and np.array_equal(mean, var)):
        torn.append((mean[:2], var[:2]))

  with attacks_of_this_test():
    program.set_arrays({"bn.mean": np.zeros(16, np.float32), "bn.var": np.zeros(16, np.float32)})
    readers = [threading.Thread(target=reader) for _ in range(3)]
    for thread in readers:
      thread.start()
    errors = _hammer([lambda k=k: writer(k) for k in range(4)])
    done.set()
    for thread in readers:
      thread.join(60)
    _thread_outcome(
      "cpu: 4 set_arrays writers x 200 with 3 readers", errors, f"{len(torn)} torn reads: {torn[:2]}" if torn else None
    )


@pytest.mark.parametrize("target", ["cpu", "vulkan"])
def test_threads_get_their_own_outputs(target):
  """8 threads x 100 calls of a counting linear layer, each with its own input: each gets its own x @ w + b."""
  if target == "vulkan":
    require_device("vulkan")
  args = ZOO["stateful_linear"].example_args(BATCH, 0)
  program = _export(
    ZOO["stateful_linear"].make(0), {"train": nnxc.method("__call__", *args, mode="train")}, target
  ).load()
  state = program.arrays()
  w, b = state["w"].astype(np.float64), state["b"].astype(np.float64)
  wrong = []

  def worker(k):
    rng = np.random.default_rng(k)
    for _ in range(100):
      x = rng.normal(size=(BATCH, 3)).astype(np.float32)
      y = program.train(x)
      if not np.allclose(y, x @ w + b, rtol=1e-5, atol=1e-5):
        wrong.append((k, y[0, :2], (x @ w + b)[0, :2]))

  with attacks_of_this_test():
    errors = _hammer([lambda k=k: worker(k) for k in range(8)])
    count = int(program.arrays()["count"])
    problem = (
      f"{len(wrong)} outputs of another call: {wrong[:2]}" if wrong else (None if count == 800 else f"count {count}")
    )
    _thread_outcome(f"{target}: 8 threads x 100 calls with their own inputs", errors, problem)


# Issue 16: the classes an independent attack found past families 1-7, each a family of its own below or a test
# in the family it belongs to.

# 3. (continued) The parameter archive's ranges: every 64-bit field of the header and of the first and last
# entry set to values that wrap 64-bit arithmetic, point before the file or past it; the archive is re-hashed.

_U64 = 1 << 64
_SEGMENTS = ("entry table", "metadata segment", "storage segment")


def _archive_fields(data: bytes) -> dict[str, tuple[int, str]]:
  """{field: (byte offset, struct format)} of params.irpa's header and of its first and last entry."""
  fields = {"version_major": (4, "<H"), "version_minor": (6, "<H"), "header_size": (8, "<Q"), "next_header": (16, "<Q")}
  fields["entry_count"] = (32, "<Q")
  for k, segment in enumerate(_SEGMENTS):
    fields[f"{segment} offset"], fields[f"{segment} length"] = (40 + 16 * k, "<Q"), (48 + 16 * k, "<Q")
  count, table = struct.unpack_from("<QQ", data, 32)
  position, entries = table, []
  for _ in range(count):
    entries.append(position)
    position += -(-struct.unpack_from("<Q", data, position)[0] // 16) * 16
  for label, position in (("first entry", entries[0]), ("last entry", entries[-1])):
    for name, offset, kind in [
      ("size", 0, "<Q"),
      ("type", 8, "<I"),
      ("name offset", 20, "<Q"),
      ("name length", 28, "<Q"),
      ("metadata offset", 36, "<Q"),
      ("metadata length", 44, "<Q"),
      ("alignment", 52, "<Q"),
      ("storage offset", 60, "<Q"),
      ("storage length", 68, "<Q"),
    ]:
      fields[f"{label} {name}"] = (position + offset, kind)
  return fields


def archive_range_cases(data: bytes) -> list[dict]:
  fields = _archive_fields(data)

  def case(label: str, changes: dict[str, int]) -> dict:
    edited = bytearray(data)
    for field, value in changes.items():
      offset, kind = fields[field]
      struct.pack_into(kind, edited, offset, value % (1 << (8 * struct.calcsize(kind))))
    return {"file": "params.irpa", "op": "replace", "data": bytes(edited).hex(), "label": label, "rehash": True}

  cases = []
  for field, (offset, kind) in fields.items():
    original = struct.unpack_from(kind, data, offset)[0]
    values = {0, 1, original + 1, original - 1, len(data), len(data) + 1, 2**31, 2**32, 2**63, _U64 - 1}
    values |= {original + 2**40, original - 2**40, -(2**40), -8, -64, -4096, original + len(data)}
    width = 1 << (8 * struct.calcsize(kind))
    for value in sorted({v % width for v in values}):
      if value != original:
        cases.append(case(f"{field} = {value:#x}", {field: value}))
  # The crafted wraps: an offset of -2**40 whose length is raised by 2**40, so that offset + length is unchanged.
  pairs = [(f"{s} offset", f"{s} length") for s in _SEGMENTS]
  pairs += [(f"{e} {r} offset", f"{e} {r} length") for e in ("first entry", "last entry") for r in ("name", "storage")]
  for offset_field, length_field in pairs:
    offset, length = (struct.unpack_from(fields[f][1], data, fields[f][0])[0] for f in (offset_field, length_field))
    for shift in (2**40, 2**63, 4096, 64):
      label = f"{offset_field} - {shift:#x} and {length_field} + {shift:#x} (wraps)"
      cases.append(case(label, {offset_field: offset - shift, length_field: length + shift}))
  return cases


_SAME_NUMBERS = re.compile(r"holds (\d+) bytes .*needs \1\b")


def test_rehashed_params_archive_ranges(mlp, x, tmp_path):
  """Issue 16 class 1 (and 11): params.irpa's offsets and lengths set to wrap 64-bit arithmetic, point before the
  file or past it, re-hashed, in child processes: refused (the message saying what is wrong) or the values of bytes
  inside the file, never a crash; IREE's parser never sees the bytes."""
  cases = archive_range_cases((mlp.directory / "params.irpa").read_bytes())
  with attacks_of_this_test():
    for case, result in zip(cases, run_isolated(tmp_path, mlp.directory, x, cases), strict=True):
      row = record_isolated("tamper", f"mlp: params.irpa {case['label']} (rehashed)", result, different="handled")
      if row.outcome == "refused" and _SAME_NUMBERS.search(row.detail):
        LEDGER.rebook(row, "wrong", f"a message that contradicts itself: {row.detail}")
  NOTES["params.irpa range edits"] = f"{len(cases)} (every header field, first and last entry, wrapped pairs)"


# 1. (continued) Parsing cost: linear in the manifest's length, bounded in memory, whatever it holds.


def _traced_steps(act) -> int:
  """Lines of compile/runtime/ that ``act()`` executes: work that does not depend on the machine."""
  steps = 0
  runtime = str(LIBRARY / "runtime")

  def local(frame, event, arg):
    nonlocal steps
    steps += event == "line"
    return local

  def tracer(frame, event, arg):
    return local if frame.f_code.co_filename.startswith(runtime) else None

  sys.settrace(tracer)
  try:
    with contextlib.suppress(nnxc.ArtifactError):
      act()
  finally:
    sys.settrace(None)
  return steps


def worst_case_manifest(document: dict, n: int) -> str:
  """``document`` with ``n`` state entries whose names all sanitize to one global name, and every one in each
  function's ``updates``: what made the uniquing loop cubic and the updates check quadratic."""
  template = next(v for v in document["state"] if v["dtype"] == "float32" and v["key_impl"] is None)
  names = [f"x{chr(0x4E00 + i)}" for i in range(n)]
  state = [dict(template, name=name, path=[name], metadata={}) for name in names]
  for entry, global_name in zip(state, nnxc.runtime.global_names(names), strict=True):
    entry["global"] = global_name
  mutant = json.loads(json.dumps(document))
  mutant["state"] = state
  for function in mutant["functions"].values():
    function["updates"] = names
  return json.dumps(mutant)


def _peak_memory(act) -> int:
  tracemalloc.start()
  try:
    with contextlib.suppress(nnxc.ArtifactError):
      act()
    return tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


def test_parsing_is_linear_and_bounded(mlp):
  """Issue 16 class 2: worst-case manifests at two sizes (4x apart): the lines the parser runs and its peak memory
  grow 4x, not 16x; a 63 MiB manifest of empty objects is refused before it is built. Wall times go to the report."""
  document = json.loads((mlp.directory / "manifest.json").read_text())
  header = f'{{"format": "nnx-metal-artifact", "format_version": {FORMAT_VERSION}, "zz": ['
  inputs = {
    "colliding names and long updates": lambda n: worst_case_manifest(document, n),
    "empty objects": lambda n: header + "{}," * (100 * n) + "{}]}",
    "numbers": lambda n: header + "0.5," * (200 * n) + "0]}",
  }
  sizes = (1000, 4000)
  with attacks_of_this_test():
    for label, make in inputs.items():
      texts = [make(n).encode() for n in sizes]
      steps = [_traced_steps(lambda t=t: Manifest.from_json(t)) for t in texts]
      peaks = [_peak_memory(lambda t=t: Manifest.from_json(t)) for t in texts]
      seconds = []
      for text in texts:
        start = time.perf_counter()
        with contextlib.suppress(nnxc.ArtifactError):
          Manifest.from_json(text)
        seconds.append(time.perf_counter() - start)
      ratio, memory_ratio = steps[1] / max(steps[0], 1), peaks[1] / max(peaks[0], 1)
      NOTES[f"parsing {label}"] = (
        f"{len(texts[0])} and {len(texts[1])} bytes: {steps[0]} and {steps[1]} lines run (x{ratio:.2f}), "
        f"peak {peaks[0] >> 10} and {peaks[1] >> 10} KiB (x{memory_ratio:.2f}), {seconds[0]:.3f} and {seconds[1]:.3f} s"
      )
      outcome = "handled" if ratio < 6 and memory_ratio < 6 and peaks[1] < 300 * len(texts[1]) else "wrong"
      LEDGER.add("manifest", f"parsing cost: {label} at 1x and 4x", outcome, NOTES[f"parsing {label}"])
    text = (header + "{}," * ((63 << 20) // 3) + "{}]}").encode()
    peak = _peak_memory(lambda: Manifest.from_json(text))
    row = judge("manifest", "document: 63 MiB of empty objects", lambda: Manifest.from_json(text))
    NOTES["peak memory refusing 63 MiB of empty objects"] = f"{peak >> 10} KiB"
    if peak > 16 << 20:
      LEDGER.rebook(row, "wrong", f"peaked at {peak >> 20} MiB before refusing")


# 1. (continued) Hostile text: lone surrogates, controls and huge integers anywhere; duplicate keys anywhere.

HOSTILE_TEXT = {
  "a lone surrogate": "\ud800",
  "a terminal escape": "\x1b[2K\rSPIR-V race check: passed",
  "a carriage return": "x\rforged",
  "a right-to-left override": "\u202egnp.exe",
  "a NUL": "x\x00y",
}


def test_hostile_text_and_literals_in_the_manifest(mlp, tmp_path):
  """Issue 16 class 3 and 13: every string field given a lone surrogate, a terminal escape, a bidirectional override;
  every number written with 5000 digits; keys duplicated in every object: refused, naming the field where it has one."""
  work = fresh_copy(mlp.directory, tmp_path / "work")
  text = (mlp.directory / "manifest.json").read_text()
  document = json.loads(text)
  with attacks_of_this_test():
    for path in json_paths(document):
      value = _get(document, path) if path else None
      if isinstance(value, str) and path[0] != "format":
        for label, hostile in HOSTILE_TEXT.items():
          mutant = json.loads(text)
          _get(mutant, path[:-1])[path[-1]] = value + hostile
          row = manifest_attack("manifest", f"{where_of(path)} with {label}", json.dumps(mutant), path, work, mlp)
          if row.outcome != "refused":
            LEDGER.rebook(row, "wrong", f"accepted {label}")
      if isinstance(value, dict) and value:
        key = next(iter(value))
        mutant = json.loads(text)
        (_get(mutant, path) if path else mutant)["__duplicate__"] = None
        duplicate = f"{json.dumps(key)}: {json.dumps(value[key])}"
        mutant_text = json.dumps(mutant).replace('"__duplicate__": null', duplicate)
        attack = f"{where_of(path) or 'the document'}: key {key!r} twice"
        row = manifest_attack("manifest", attack, mutant_text, (), work, mlp)
        if row.outcome != "refused":
          LEDGER.rebook(row, "wrong", "accepted a duplicate key")
    for number in sorted(set(re.findall(r"(?<![\w.\"])\d+(?![\w.\"])", text)))[:40]:
      mutant_text = re.sub(rf"(?<![\w.\"]){number}(?![\w.\"])", "9" * 5000, text, count=1)
      row = manifest_attack("manifest", f"the number {number} written with 5000 digits", mutant_text, (), work, mlp)
      if row.outcome != "refused":
        LEDGER.rebook(row, "wrong", "accepted a 5000-digit integer")


# 4. (continued) Opens and saves never block: a FIFO where a folder should be, a lock someone else holds.

LOCK_HOLDER = textwrap.dedent(
  """
  import fcntl, os, sys, time
  descriptor = os.open(sys.argv[1], os.O_RDONLY)
  fcntl.flock(descriptor, fcntl.LOCK_EX)
  print("locked", flush=True)
  time.sleep(600)
  """
)


def _bounded(act, seconds: float = 60):
  """Runs ``act`` in a thread; returns ('hung', None) if it is still running after ``seconds``."""
  result = {}

  def run():
    try:
      result["value"] = act()
    except BaseException as e:  # noqa: BLE001 - judged by the caller
      result["error"] = e

  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  thread.join(seconds)
  if thread.is_alive():
    return "hung", None
  if "error" in result:
    raise result["error"]
  return "done", result.get("value")


def test_opens_and_saves_never_block(mlp, tmp_path, monkeypatch):
  """Issue 16 class 4: Artifact.open and save through a FIFO where a folder should be, and with the parent's lock held
  by another process for good: refused within the lock wait (set to 1 s here), never blocked."""
  artifact = nnxc.Artifact.open(mlp.directory)
  fifo = tmp_path / "fifo"
  os.mkfifo(fifo)
  monkeypatch.setattr(_files, "LOCK_WAIT_SECONDS", 1.0)
  locked = fresh_copy(mlp.directory, tmp_path / "locked" / "art")
  holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(locked.parent)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    attacks = [
      ("open a path under a FIFO", lambda: nnxc.Artifact.open(fifo / "x")),
      ("open a FIFO as the artifact", lambda: nnxc.Artifact.open(fifo)),
      ("load_program under a FIFO", lambda: nnxc.load_program(fifo / "x" / "y")),
      ("save under a FIFO", lambda: artifact.save(fifo / "x")),
      ("open with the parent locked by another process", lambda: nnxc.Artifact.open(locked)),
      ("save with the parent locked by another process", lambda: artifact.save(locked)),
      ("save next to it with the parent locked", lambda: artifact.save(locked.parent / "other")),
    ]
    with attacks_of_this_test():
      for attack, act in attacks:
        with fifo_watchdog(tmp_path, seconds=20) as watch:
          row = judge(
            "paths", attack, lambda act=act: _bounded(act, 30), lambda r: "hung" if r[0] == "hung" else "accepted"
          )
        if watch["hung"] or row.detail == "hung":
          LEDGER.rebook(row, "crashed", "hung")
  finally:
    holder.kill()
    holder.wait()
  assert nnxc.Artifact.open(locked).digest == nnxc.Artifact.open(mlp.directory).digest


# 5. (continued) Saves never lose a user's data, never write a broken artifact, and are byte-reproducible.


def _project_claiming_the_format(path: pathlib.Path, mlp_directory: pathlib.Path, how: str) -> None:
  (path / "src").mkdir(parents=True)
  (path / "src" / "model.py").write_text("precious")
  manifest = {"format": "nnx-metal-artifact", "format_version": FORMAT_VERSION}
  if how == "lists files with wrong hashes":
    manifest["files"] = {"module.vmfb": "0" * 64, "params.irpa": "0" * 64}
    (path / "module.vmfb").write_bytes(b"mine")
    (path / "params.irpa").write_bytes(b"mine")
  elif how == "lists files it does not have":
    manifest["files"] = json.loads((mlp_directory / "manifest.json").read_text())["files"]
  elif how == "lists ../ files":
    manifest["files"] = {"module.vmfb": "0" * 64, "params.irpa": "0" * 64, "../src/model.py": sha256(b"precious")}
  (path / "manifest.json").write_text(json.dumps(manifest))


def _user_files(path: pathlib.Path) -> None:
  """A user's things inside an artifact: a report, a folder, a file in a kernel folder, a link, a FIFO."""
  (path / "report.html").write_text("<p>my report</p>")
  (path / "notes").mkdir()
  (path / "notes" / "todo.txt").write_text("retrain")
  (path / "msl").mkdir(exist_ok=True)
  (path / "msl" / "README").write_text("mine")
  (path / "latest").symlink_to("report.html")
  os.mkfifo(path / "pipe")


def test_saves_never_lose_a_users_data(mlp, tmp_path):
  """Issue 16 class 5: a folder whose manifest.json merely claims the format is not replaced; files a user put into an
  artifact survive a save onto it; folders named like a temporary are not a save's to delete."""
  artifact = nnxc.Artifact.open(mlp.directory)
  dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)
  with attacks_of_this_test():
    for how in (
      "claims the format",
      "lists files with wrong hashes",
      "lists files it does not have",
      "lists ../ files",
    ):
      root = tmp_path / f"project-{how.replace(' ', '-').replace('/', '')}"
      _project_claiming_the_format(root / "target", mlp.directory, how)
      before = snapshot(root)
      row = judge("saving", f"save onto a project whose manifest {how}", lambda r=root: artifact.save(r / "target"))
      if row.outcome != "refused" or snapshot(root) != before:
        LEDGER.rebook(row, "wrong", "replaced a folder that is no artifact")
    for overwrite in (False, True):
      target = fresh_copy(mlp.directory, tmp_path / f"with-user-files-{overwrite}" / "art")
      _user_files(target)
      mine = {
        k: v
        for k, v in snapshot(target).items()
        if k in ("report.html", "notes", "notes/todo.txt", "msl/README", "latest", "pipe")
      }

      def act(target=target, overwrite=overwrite):
        artifact.save(target, overwrite=overwrite)
        return observe(target, mlp.calls)

      with fifo_watchdog(target.parent) as watch:
        row = judge(
          "saving",
          f"save onto an artifact holding a user's files (overwrite={overwrite})",
          act,
          lambda s: differences(mlp.reference, s),
        )
      kept = {k: v for k, v in snapshot(target).items() if k in mine}
      if watch["hung"]:
        LEDGER.rebook(row, "crashed", "hung on the user's FIFO")
      elif kept != mine:
        LEDGER.rebook(row, "wrong", f"lost {sorted(set(mine) - set(kept))} or changed them")
    root = tmp_path / "temporary-names"
    root.mkdir()
    users = [root / f".art.tmp-{dead_pid}-abc123", root / f".art.tmp-{dead_pid}-mine", root / ".art.tmp-1-x"]
    for folder in users:
      folder.mkdir()
      (folder / "thesis.tex").write_text("years of work")
    (users[1] / _files.MARKER).write_text("other")  # a marker naming another save's target
    before = {folder.name: snapshot(folder) for folder in users}
    row = judge("saving", "save next to a user's folders named like temporaries", lambda: artifact.save(root / "art"))
    if {folder.name: snapshot(folder) for folder in users if folder.exists()} != before:
      LEDGER.rebook(row, "wrong", "deleted or changed a user's folder named like a temporary")


def test_saves_never_write_a_broken_artifact(mlp, tmp_path):
  """Issue 16 class 6: with_params given float64, missing, extra, None, list or object arrays, and Artifact(...) built
  with them directly: refused before anything is written; the working artifact stays whole."""
  artifact = nnxc.Artifact.open(mlp.directory)
  params = artifact.params
  first = next(iter(params))
  bad = {
    "float64 for float32": {**params, first: params[first].astype(np.float64)},
    "a missing entry": {k: v for k, v in params.items() if k != first},
    "an extra entry": {**params, "extra": params[first]},
    "an object array": {**params, first: params[first].astype(object)},
    "None for an entry": {**params, first: None},
    "a list for an entry": {**params, first: params[first].tolist()},
    "a transposed shape": {**params, "linear1.w": params["linear1.w"].T.copy()},
    "a string array": {**params, first: np.array(["x"] * params[first].size)},
    "not a dict": [params[first]],
    "a non-string key": {**params, 5: params[first]},
  }
  with attacks_of_this_test():
    for label, values in bad.items():
      target = fresh_copy(mlp.directory, tmp_path / "art")
      before = snapshot(target.parent)
      for how, act in [
        ("with_params", lambda v=values, t=target: artifact.with_params(v).save(t)),
        ("Artifact(...)", lambda v=values, t=target: nnxc.Artifact(artifact.manifest, artifact.files, v).save(t)),
      ]:
        row = judge("saving", f"{how} with {label}, saved onto a working artifact", act)
        if row.outcome != "refused" or snapshot(target.parent) != before:
          LEDGER.rebook(row, "wrong", "wrote an artifact from parameters that do not fit")


def test_artifacts_are_byte_reproducible(tmp_path):
  """Issue 16 class 10: two fresh exports of one model (no compile cache) save byte-identical artifacts, manifest
  included, so one digest pins both."""
  args = ZOO["mlp"].example_args(BATCH, 0)
  functions = {m: nnxc.method("__call__", *args, mode=m) for m in ("train", "eval")}
  digests, contents = [], []
  with attacks_of_this_test():
    for k in range(2):
      written = nnxc.export(ZOO["mlp"].make(0), functions, target="cpu", cache=False).save(tmp_path / f"art{k}")
      digests.append(written.digest)
      contents.append(snapshot(tmp_path / f"art{k}"))
    different = sorted(name for name in contents[0] if contents[0][name] != contents[1].get(name))
    LEDGER.add(
      "saving",
      "two fresh exports of one model: the same bytes and digest",
      "handled"
      if digests[0] == digests[1] and not different and nnxc.Artifact.open(tmp_path / "art1").digest == digests[0]
      else "wrong",
      f"digests {digests}, files that differ: {different}",
    )


# 8. The command line: hostile files, FIFOs, hostile manifest text, what inspect says, where outputs go.


def _cli(argv: list[str], seconds: float = 120) -> tuple[str, int | None, str, str]:
  """Runs ``nnx-metal argv`` in this process: ('done' or 'hung', exit status, stdout, stderr); raises what escapes."""
  out, err = io.StringIO(), io.StringIO()

  def act():
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      try:
        return cli.main(argv)
      except SystemExit as e:
        return e.code

  state, status = _bounded(act, seconds)
  return state, status, out.getvalue(), err.getvalue()


def cli_attack(attack: str, argv: list[str], check=None, *, refuse: bool = True) -> Row:
  """A command line: a user mistake is one stderr line with exit status 2 ('refused'); a success must pass ``check``."""
  try:
    state, status, out, err = _cli(argv)
  except Exception as e:  # noqa: BLE001 - a traceback for the user
    return LEDGER.add("cli", attack, "raw", f"{type(e).__name__}: {e} at {library_frame(e)}")
  if state == "hung":
    return LEDGER.add("cli", attack, "crashed", "hung")
  printed = out + err
  if any(c in printed for c in ("\x1b", "\r", "\u202e")) or re.search(r"[\ud800-\udfff]", printed):
    return LEDGER.add("cli", attack, "wrong", f"printed raw control characters: {printed[:200]!r}")
  if status == 2:
    lines = [line for line in err.splitlines() if line.strip()]
    if "Traceback" in err or len(lines) != 1:
      return LEDGER.add("cli", attack, "raw", f"not one line: {err[-300:]}")
    return LEDGER.add("cli", attack, "refused", lines[0])
  if status == 0:
    problem = check(out) if check else ("accepted" if refuse else None)
    return LEDGER.add("cli", attack, "wrong" if problem else "handled", problem or out[-200:])
  return LEDGER.add("cli", attack, "raw", f"exit status {status}: {err[-300:]}")


def _npy_header_cases(x: np.ndarray, rng: random.Random) -> list[tuple[str, bytes]]:
  buffer = io.BytesIO()
  np.save(buffer, x)
  full = buffer.getvalue()
  header_end = full.index(b"\n") + 1
  cases = [(f"cut at byte {n}", full[:n]) for n in range(0, header_end + 1, 7)]
  for i in range(40):
    data = bytearray(full)
    for _ in range(rng.randrange(1, 4)):
      data[rng.randrange(10, header_end)] = rng.randrange(256)
    cases.append((f"header bytes changed #{i}", bytes(data[: rng.randrange(header_end // 2, len(data))])))
  dictionary = "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 2), }"
  for label, text in [
    ("dict cut inside a tuple", dictionary[:52]),
    ("dict cut after a quote", dictionary[:10]),
    ("shape with 5000 digits", dictionary.replace("(4, 2)", f"({'9' * 5000},)")),
    ("shape nested 3000 deep", dictionary.replace("(4, 2)", "(" * 3000 + ")" * 3000)),
    ("a list for the dict", "[1, 2, 3]"),
    ("descr a dict", dictionary.replace("'<f4'", "{'a': 1}")),
  ]:
    body = text.encode("latin1").ljust(118) + b"\n"
    cases.append((label, b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body + full[header_end:]))
  return cases


def test_the_command_line(mlp, x, tmp_path, monkeypatch):
  """Issue 16 classes 3, 4, 5, 9 at the command line: .npy headers cut or garbled, --args beyond Python's JSON limits,
  FIFOs for --input and --output, --output a directory or /, inspect --html onto the artifact's own files, manifest
  text that would drive the terminal, and edited descriptive fields: one line and exit status 2, or done right."""
  monkeypatch.chdir(tmp_path)
  artifact = fresh_copy(mlp.directory, tmp_path / "art")
  digest = nnxc.Artifact.open(artifact).digest
  run = ["run", str(artifact), "--function", "eval"]
  with attacks_of_this_test():
    for label, data in _npy_header_cases(x, random.Random(16)):
      (tmp_path / "x.npy").write_bytes(data)
      cli_attack(f"run --input @x.npy: {label}", [*run, "--input", "@x.npy"], lambda out: None)
    fifo = tmp_path / "fifo.npy"
    os.mkfifo(fifo)
    with fifo_watchdog(tmp_path, seconds=20):
      cli_attack("run --input @FIFO", [*run, "--input", f"@{fifo}"])
      cli_attack("run --output FIFO", [*run, "--input", "4x2xf32", "--output", str(fifo)])
      cli_attack(
        "run --output FIFO named without .npy", [*run, "--input", "4x2xf32", "--output", str(tmp_path / "fifo")]
      )
      cli_attack("inspect --html FIFO", ["inspect", str(artifact), "--html", str(fifo)])
    (tmp_path / "outdir").mkdir()
    for label, output in [
      ("a directory", "outdir"),
      ("a directory with a slash", "outdir/"),
      ("/", "/"),
      ("a new folder/", "new/"),
      ("empty", ""),
    ]:
      row = cli_attack(f"run --output {label}", [*run, "--input", "4x2xf32", "--output", output])
      if os.path.exists("outdir.npy") or os.path.exists("/.npy") or os.path.exists("new.npy"):
        LEDGER.rebook(row, "wrong", "wrote DIR.npy")
    for label, args in [
      ("an integer of 5000 digits", "9" * 5000),
      ("3000-deep brackets", "[" * 3000 + "]" * 3000),
      ("3000-deep objects", '{"a":' * 3000 + "1" + "}" * 3000),
      ("a float of 5000 digits", "1" * 5000 + ".5"),
    ]:
      cli_attack(f"build --args {label}", ["build", "nnx_models:MLP", "--args", args, "--target", "cpu", "--out", "o"])
    for file in ("module.vmfb", "params.irpa", "manifest.json", "module.mlir"):
      before = snapshot(artifact)
      row = cli_attack(
        f"inspect --html onto the artifact's {file}", ["inspect", str(artifact), "--html", str(artifact / file)]
      )
      if snapshot(artifact) != before:
        LEDGER.rebook(row, "wrong", f"overwrote {file}")
    (artifact / "alias.html").symlink_to("module.vmfb")
    os.link(artifact / "params.irpa", tmp_path / "hard.html")
    for label, path in [
      ("a link to module.vmfb", artifact / "alias.html"),
      ("a hard link of params.irpa", tmp_path / "hard.html"),
    ]:
      before = snapshot(artifact)
      row = cli_attack(f"inspect --html onto {label}", ["inspect", str(artifact), "--html", str(path)])
      if snapshot(artifact) != before:
        LEDGER.rebook(row, "wrong", "overwrote a file of the artifact")
    (artifact / "alias.html").unlink()
    cli_attack(
      "inspect --html report.html inside the artifact, then a save onto it",
      ["inspect", str(artifact), "--html", str(artifact / "report.html")],
      lambda out: (
        (nnxc.Artifact.open(artifact).save(artifact), None)[1]
        or (None if (artifact / "report.html").exists() else "the save deleted report.html")
      ),
      refuse=False,
    )
    for label, hostile in HOSTILE_TEXT.items():
      for field in ("model", "versions.jax", "flags[0]"):
        work = fresh_copy(mlp.directory, tmp_path / "hostile")

        def edit(m, field=field, hostile=hostile):
          if field == "model":
            m["model"] += hostile
          elif field == "versions.jax":
            m["versions"]["jax"] += hostile
          else:
            m["flags"][0] += hostile

        edit_manifest(work, edit)
        cli_attack(f"inspect: {field} with {label}", ["inspect", str(work)])
    descriptive = {
      "model": lambda m: m.update(model="evil:Model"),
      "hazard_check": lambda m: m.update(hazard_check="passed"),
      "versions": lambda m: m["versions"].update(jax="0.0.1"),
      "flags": lambda m: m["flags"].append("--iree-opt-level=O0"),
      "dispatches": lambda m: m["dispatches"].append("forged_dispatch_0"),
      "rewrites": lambda m: m["rewrites"].update(forged=1),
      "objects": lambda m: m.update(objects={"a": "evil:Model"}),
    }
    for field, edit in descriptive.items():
      work = fresh_copy(mlp.directory, tmp_path / "edited")
      edit_manifest(work, edit)

      def says_unauthenticated(out, field=field):
        lines = [line for line in out.splitlines() if line.startswith("not authenticated")]
        return (
          None
          if lines and field in lines[0]
          else f"inspect showed the edited {field} without saying it is unauthenticated"
        )

      cli_attack(f"inspect of an artifact whose {field} was edited", ["inspect", str(work)], says_unauthenticated)
      cli_attack(
        f"inspect --digest of an artifact whose {field} was edited", ["inspect", str(work), "--digest", digest]
      )
    cli_attack(
      "inspect --digest of the untouched artifact",
      ["inspect", str(artifact), "--digest", digest],
      lambda out: None if "every field authenticated" in out else "no word on authentication",
    )


# 9. Program API misuse: clear errors, nothing changed; typed keys round-trip.


def test_program_api_misuse(mlp, x):
  """Issue 16 class 8: typed PRNG keys (what state() returns) pushed back, set_arrays, arrays, state, functional,
  load_state with what they do not take, and an input list that holds itself: a StateMismatchError or
  SignatureError, the state unchanged; the typed keys round-trip bit for bit."""
  program = nnxc.load_program(mlp.directory)
  state = program.state()
  key = state["dropout"]["rngs"]["key"].get_value()
  looped = []
  looped.append(looped)
  deep = x
  for _ in range(200):
    deep = [deep]
  misuse = [
    ("set_arrays(a list)", lambda: program.set_arrays([x])),
    ("set_arrays(None)", lambda: program.set_arrays(None)),
    ("set_arrays(a string)", lambda: program.set_arrays("bn.mean")),
    ("set_arrays({a list key: ...})", lambda: program.set_arrays({("bn", "mean"): x})),
    ("arrays(5)", lambda: program.arrays(5)),
    ("arrays('bn.mean')", lambda: program.arrays("bn.mean")),
    ("arrays([5])", lambda: program.arrays([5])),
    ("arrays([['bn.mean']])", lambda: program.arrays([["bn.mean"]])),
    ("state(123)", lambda: program.state(123)),
    ("state(object())", lambda: program.state(object())),
    ("functional('nope')", lambda: program.functional("nope")),
    ("functional(5)", lambda: program.functional(5)),
    ("functional(['eval'])", lambda: program.functional(["eval"])),
    ("load_state(None)", lambda: program.load_state(None)),
    ("load_state(5)", lambda: program.load_state(5)),
    ("load_state('model')", lambda: program.load_state("model")),
    ("load_state(state, filter=123)", lambda: program.load_state(state, 123)),
    ("eval(a list that holds itself)", lambda: program.eval(looped)),
    ("eval(200-deep lists)", lambda: program.eval(deep)),
    ("eval(a typed key)", lambda: program.eval(key)),
    ("set_arrays a typed key into a float", lambda: program.set_arrays({"bn.mean": key})),
  ]
  with attacks_of_this_test():
    for attack, act in misuse:
      before = program.arrays()
      row = judge("api", attack, act, lambda _: "accepted")
      if differences(before, program.arrays()):
        LEDGER.rebook(row, "wrong", "a refused call changed the state")
    before = program.arrays()
    judge(
      "api",
      "load_state(program.state()): typed keys pushed back",
      lambda: (program.load_state(state), program.arrays())[1],
      lambda got: differences(before, got),
    )
    judge(
      "api",
      "set_arrays({key: a typed key})",
      lambda: (program.set_arrays({"dropout.rngs.key": key}), program.arrays())[1],
      lambda got: differences(before, got),
    )
    judge(
      "api",
      "functional('train') with the state() it returns",
      lambda: program.functional("train")(state, x)[1],
      lambda got: None if isinstance(got, nnx.State) else "no State",
    )


# 10. Disk space, permissions and names.

FSIZE_SAVER = textwrap.dedent(
  """
  import json, resource, sys
  import compile
  source, target, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
  artifact = compile.Artifact.open(source)
  resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ: writes fail with EFBIG
  try:
    artifact.save(target)
    print(json.dumps({"outcome": "saved"}))
  except compile.NnxMetalError as e:
    print(json.dumps({"outcome": "refused", "detail": f"{type(e).__name__}: {e}"}))
  except BaseException as e:
    print(json.dumps({"outcome": "raw", "detail": f"{type(e).__name__}: {e}"}))
  """
)


def test_disk_full_and_file_size_limits(mlp, tmp_path):
  """Issue 16 class 6: a save that runs out of room (RLIMIT_FSIZE, in a child: every write past it fails) at each
  file of the artifact: an ArtifactError, the artifact that was there whole, no temporary left."""
  sizes = sorted({p.stat().st_size for p in mlp.directory.iterdir()})
  limits = sorted({0, 1, 512, *(s // 2 for s in sizes), *(s - 1 for s in sizes), *(s + 4096 for s in sizes)})
  (tmp_path / "saver.py").write_text(FSIZE_SAVER)
  old = nnxc.Artifact.open(mlp.directory).digest
  with attacks_of_this_test():
    for limit in limits:
      target = fresh_copy(mlp.directory, tmp_path / "root" / "art")
      result = subprocess.run(
        [sys.executable, str(tmp_path / "saver.py"), str(mlp.directory), str(target), str(limit)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
      )
      attack = f"save with a file-size limit of {limit} bytes"
      if result.returncode != 0:
        LEDGER.add("resources", attack, "crashed" if result.returncode < 0 else "raw", result.stderr[-300:])
        continue
      outcome = json.loads(result.stdout.splitlines()[-1])
      row = LEDGER.add(
        "resources", attack, {"saved": "handled"}.get(outcome["outcome"], outcome["outcome"]), outcome.get("detail", "")
      )
      left = [p.name for p in target.parent.iterdir() if p.name != "art"]
      if left or nnxc.Artifact.open(target).digest != old:
        LEDGER.rebook(row, "wrong", f"left {left} or broke the artifact there")


BUILD_UNDER_A_LIMIT = textwrap.dedent(
  """
  import resource, sys
  from compile import cli
  limit = int(sys.argv[1])
  resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
  sys.exit(cli.main(["build", "nnx_models:MLP", "--args", "2,16,5", "--input", "4x2xf32", "--target", "cpu",
                     "--out", sys.argv[2]]))
  """
)


def test_build_with_a_file_size_limit(tmp_path):
  """Issue 16 class 6: `nnx-metal build` where writes fail (the compile cache's, iree-compile's, the save's): one
  line and exit status 2, never a traceback; or a whole artifact."""
  with attacks_of_this_test():
    for limit in (1024, 64 << 10, 1 << 30):
      out = tmp_path / f"built-{limit}"
      env = {**os.environ, "PYTHONPATH": str(REPO), "NNX_METAL_CACHE": str(tmp_path / f"cache-{limit}")}
      result = subprocess.run(
        [sys.executable, "-c", BUILD_UNDER_A_LIMIT, str(limit), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
      )
      attack = f"nnx-metal build with a file-size limit of {limit} bytes"
      errors = [line for line in result.stderr.splitlines() if line.startswith("nnx-metal")]
      if result.returncode == 2 and "Traceback" not in result.stderr and len(errors) == 1:
        LEDGER.add("resources", attack, "refused", errors[0])
      elif result.returncode == 0:
        judge("resources", attack, lambda o=out: nnxc.Artifact.open(o).digest)
      else:
        outcome = "crashed" if result.returncode < 0 else "raw"
        LEDGER.add("resources", attack, outcome, f"exit {result.returncode}: {result.stderr[-300:]}")


def _modes(root: pathlib.Path) -> dict[str, int]:
  modes = {".": stat.S_IMODE(os.lstat(root).st_mode)}
  for path in root.rglob("*"):
    modes[path.relative_to(root).as_posix()] = stat.S_IMODE(os.lstat(path).st_mode)
  return modes


def test_permissions_follow_the_umask(mlp, tmp_path):
  """Issue 16 class 7: a saved artifact's folders get 0777 and its files 0666 less the umask (params.irpa too), as
  anything else the user makes; re-saving over an artifact keeps the directory's mode."""
  artifact = nnxc.Artifact.open(mlp.directory)
  old = os.umask(0o022)
  try:
    with attacks_of_this_test():
      for umask in (0o022, 0o027, 0o077, 0o002, 0o000):
        os.umask(umask)
        target = tmp_path / f"umask-{umask:03o}" / "art"
        row = judge("resources", f"save under umask {umask:03o}", lambda t=target: artifact.save(t))
        expected = {k: (0o777 if k == "." or (target / k).is_dir() else 0o666) & ~umask for k in _modes(target)}
        if row.outcome == "handled" and _modes(target) != expected:
          LEDGER.rebook(row, "wrong", f"modes {[(k, oct(v)) for k, v in _modes(target).items()]}")
      for mode in (0o755, 0o750, 0o700, 0o775):
        os.umask(0o077)
        target = fresh_copy(mlp.directory, tmp_path / f"mode-{mode:03o}" / "art")
        os.chmod(target, mode)
        row = judge(
          "resources", f"re-save over a {mode:03o} artifact under umask 077", lambda t=target: artifact.save(t)
        )
        if row.outcome == "handled" and stat.S_IMODE(os.stat(target).st_mode) != mode:
          LEDGER.rebook(row, "wrong", f"the directory became {oct(stat.S_IMODE(os.stat(target).st_mode))}")
  finally:
    os.umask(old)


class _LongNames(nnx.Module):
  def __init__(self, length: int):
    self.length = length
    setattr(self, "v" * length, nnx.Param(np.ones((2,), np.float32)))

  def __call__(self, x):
    return x * getattr(self, "v" * self.length)


def test_names_export_takes_save_takes(tmp_path):
  """Issue 16 class 12: function names of 64 to 254 characters and variable names of 240 to 254: export refuses
  what save could not write (a function name over 64 characters names files past 255 bytes); what export takes,
  save and open take."""
  x = np.ones((2,), np.float32)
  with attacks_of_this_test():
    for length in (64, 65, 128, 240, 254):
      attack = f"a function name of {length} characters"
      try:
        artifact = nnxc.export(_LongNames(3), {"f" * length: nnxc.method("__call__", x)}, target="cpu", cache=False)
      except ValueError as e:  # export checks its arguments before compiling, with ValueError as Python APIs do
        LEDGER.add("resources", attack, "refused" if "Function name" in str(e) else "raw", f"ValueError: {e}")
        continue
      judge(
        "resources", attack, lambda a=artifact, n=length: nnxc.Artifact.open(saved(a, tmp_path / f"f{n}")).functions
      )
    for length in (240, 254):
      judge(
        "resources",
        f"a variable name of {length} characters",
        lambda length=length: nnxc.load_program(
          saved(
            nnxc.export(_LongNames(length), {"f": nnxc.method("__call__", x)}, target="cpu", cache=False),
            tmp_path / f"variable-{length}",
          )
        ).f(x),
        lambda y: differences(x * np.ones((2,), np.float32), y),
      )
    artifact = nnxc.export(_LongNames(3), {"f": nnxc.method("__call__", x)}, target="cpu", cache=False)
    for length in (250, 256, 1000):
      evil = nnxc.Artifact(artifact.manifest, {**artifact.files, f"msl/{'k' * length}.metal": b""}, artifact.params)
      row = judge(
        "resources", f"save a kernel file named with {length} characters", lambda e=evil: e.save(tmp_path / "kernels")
      )
      if os.path.exists(tmp_path / "kernels") and row.outcome == "refused":
        LEDGER.rebook(row, "wrong", "a refused save wrote something")


# 13. The suite's own rules.


def test_known_raw_names_functions_that_exist():
  """Every KNOWN_RAW entry names a function in a file of compile/ that exists: otherwise a regression would be
  booked as a plain raw exception, not as the fixed bug it is."""
  missing = []
  for _, file, function, _, bug in KNOWN_RAW:
    paths = list(LIBRARY.rglob(file))
    names = {
      node.name for path in paths for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)
    }
    if len(paths) != 1 or function not in names:
      missing.append((bug, file, function))
  assert not missing, f"KNOWN_RAW names functions that do not exist: {missing}"


def test_the_ledger_books_a_fixed_bug_that_came_back_as_wrong():
  """The ledger's rule holds however a row is booked: a fixed bug counts as wrong, an open one as known."""
  ledger = Ledger()
  fixed = ledger.add("manifest", "a", "known_bug", "x", "B13")
  rebooked = ledger.add("manifest", "b", "handled")
  ledger.rebook(rebooked, "known_bug", "y", "B13")
  open_bug = ledger.add("tamper", "c", "known_bug", "z", "B7")
  assert (fixed.outcome, rebooked.outcome, open_bug.outcome) == ("wrong", "wrong", "known_bug")
  assert "regression of B13" in fixed.detail and "regression of B13" in rebooked.detail


# The bugs, one regression test each.


def _refused(act) -> bool:
  try:
    act()
  except nnxc.NnxMetalError:
    return True
  return False


def test_fixed_updates_with_a_list(mlp):
  document = json.loads((mlp.directory / "manifest.json").read_text())
  document["functions"]["train"]["updates"] = [["bn.mean"]]
  with pytest.raises(nnxc.ArtifactError, match=r"functions\.train\.updates\[0\]"):
    Manifest.from_json(json.dumps(document))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")  # flax on the edited metadata
@pytest.mark.parametrize("metadata", [{"value": 1}, {"sharding": "x"}, {"hijax": True}, {"on_get_value": "x"}])
def test_fixed_metadata_reaches_the_variable_constructor(counter_artifact, tmp_path, metadata):
  directory = saved(counter_artifact, tmp_path / "counter")
  edit_manifest(directory, lambda m: m["state"][0]["metadata"].update(metadata))
  model = ZOO["counter"].make(0)
  try:
    program = nnxc.load_program(directory)  # the module records the metadata too: an edit is refused here
    state = program.state()
    program.update(model)  # merges the device state, metadata included, into the user's model
  except nnxc.NnxMetalError:
    return
  assert type(state["count"]) is type(model.count), f"the State holds a {type(state['count']).__name__}"
  assert int(model.count.get_value()) == 0


def test_fixed_swapped_state_names_are_misread(mlp, tmp_path):
  directory = fresh_copy(mlp.directory, tmp_path / "mlp")

  def swap(m):
    a, b = (next(v for v in m["state"] if v["name"] == n) for n in ("bn.mean", "bn.var"))
    a["name"], b["name"], a["path"], b["path"] = b["name"], a["name"], b["path"], a["path"]

  edit_manifest(directory, swap)
  original = nnxc.load_program(mlp.directory).arrays()
  if not _refused(lambda: nnxc.load_program(directory)):
    got = nnxc.load_program(directory).arrays()
    assert np.array_equal(got["bn.mean"], original["bn.mean"]), "bn.mean reads bn.var's values"


def test_fixed_signedness_edits_reinterpret_values(negative_counter, tmp_path):
  directory = fresh_copy(negative_counter.directory, tmp_path / "counter")
  edit_manifest(directory, lambda m: m["state"][0].update(dtype="uint32", device_dtype="uint32"))
  if not _refused(lambda: nnxc.load_program(directory)):
    count = nnxc.load_program(directory).arrays()["count"]
    assert int(count) == -3, f"the count -3 reads as {count!r}"


def test_fixed_vmfb_for_another_device(counter_artifact, tmp_path):
  directory = saved(counter_artifact, tmp_path / "counter")
  target = {"name": "vulkan", "backend": "vulkan-spirv", "drivers": ["vulkan"], "demote_f64": True}
  edit_manifest(directory, lambda m: m.update(target=target))
  require_device("vulkan")
  assert _refused(lambda: nnxc.load_program(directory))


def test_fixed_rehashed_params_header_flip(mlp, tmp_path):
  directory = fresh_copy(mlp.directory, tmp_path / "mlp")
  data = bytearray((directory / "params.irpa").read_bytes())
  data[18] ^= 0x80  # the header size field of the archive: far past the end of the file
  (directory / "params.irpa").write_bytes(bytes(data))
  rehash(directory, "params.irpa")
  assert _refused(lambda: nnxc.Artifact.open(directory))


def test_a_pinned_digest_refuses_every_rehashed_vmfb(mlp, tmp_path):
  """B7: 300 seeded single-bit flips in module.vmfb, hash recomputed: opened with the digest recorded at export,
  every one is refused before the module is loaded (the unpinned flips are counted in family 3 as B7)."""
  digest = nnxc.Artifact.open(mlp.directory).digest
  size = (mlp.directory / "module.vmfb").stat().st_size
  rng = random.Random(11)
  directory = fresh_copy(mlp.directory, tmp_path / "mlp")
  original = (mlp.directory / "module.vmfb").read_bytes()
  for _ in range(300):
    data = bytearray(original)
    bit = rng.randrange(size * 8)
    data[bit // 8] ^= 1 << (bit % 8)
    (directory / "module.vmfb").write_bytes(bytes(data))
    rehash(directory, "module.vmfb")
    with pytest.raises(nnxc.ArtifactError, match="is not the artifact of digest") as refused:
      nnxc.Artifact.open(directory, digest=digest)
    LEDGER.add(
      "tamper", f"mlp: module.vmfb bit {bit} flipped, hash recomputed, digest pinned", "refused", str(refused.value)
    )
  assert nnxc.Artifact.open(mlp.directory, digest=digest).digest == digest


def test_fixed_params_swapped_after_the_hash_check(counter_artifact, tmp_path, monkeypatch):
  directory = _counter_with(counter_artifact, 5, tmp_path / "counter")
  other = _counter_with(counter_artifact, 1234, tmp_path / "other")
  check_module = _artifact.check_module

  def racing_writer(vmfb, manifest):  # runs between the hash check and the parse, as a racing writer could
    shutil.copy(other / "params.irpa", directory / "params.irpa")
    return check_module(vmfb, manifest)

  monkeypatch.setattr(_artifact, "check_module", racing_writer)
  try:
    artifact = nnxc.Artifact.open(directory)
  except nnxc.NnxMetalError:
    return
  count = int(artifact.params["count"])
  assert count == 5, f"open() returned the values of a params.irpa whose hash it never checked (count {count})"


def _run_child(script: str, *, limit_memory: bool = False) -> subprocess.CompletedProcess:
  if limit_memory:  # set by the child itself: a preexec_fn would run Python between fork and exec
    script = "import resource\nresource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))\n" + script
  return subprocess.run(
    [sys.executable, "-c", script],
    cwd=REPO,
    env={**os.environ, "PYTHONPATH": str(REPO)},
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_fixed_params_truncated_after_open(mlp, tmp_path):
  directory = fresh_copy(mlp.directory, tmp_path / "mlp")
  script = textwrap.dedent(
    f"""
    import os
    import numpy as np
    import compile
    artifact = compile.Artifact.open({str(directory)!r})
    os.truncate({str(directory / "params.irpa")!r}, 0)  # e.g. `cp other.irpa params.irpa` by another process
    print(sum(float(np.sum(v)) for v in artifact.params.values()))
    """
  )
  result = _run_child(script)
  assert result.returncode >= 0, f"the interpreter was killed by {signal.Signals(-result.returncode).name}"


def test_fixed_huge_sparse_file(mlp, tmp_path):
  directory = fresh_copy(mlp.directory, tmp_path / "mlp")
  script = textwrap.dedent(
    f"""
    import compile
    with open({str(directory / "module.mlir")!r}, "wb") as f:
      f.truncate(1 << 40)  # sparse: no disk space, and listed with any hash
    try:
      compile.Artifact.open({str(directory)!r})
    except compile.NnxMetalError:
      print("refused")
    except BaseException as e:
      print("raw", type(e).__name__)
    """
  )
  result = _run_child(script, limit_memory=True)
  (directory / "module.mlir").unlink()
  assert result.stdout.strip() == "refused", result.stdout + result.stderr[-500:]


def test_fixed_dict_input_with_mixed_keys(mlp, x):
  program = nnxc.load_program(mlp.directory)
  with pytest.raises(nnxc.SignatureError):
    program.eval({1: x, "b": x})


@pytest.mark.parametrize("where", ["dot", "under a file"])
def test_fixed_save_onto_unsaveable_paths(mlp, tmp_path, monkeypatch, where):
  artifact = nnxc.Artifact.open(mlp.directory)
  if where == "dot":
    monkeypatch.chdir(fresh_copy(mlp.directory, tmp_path / "cwd"))
    path = "."
  else:
    (tmp_path / "file").write_text("x")
    path = tmp_path / "file" / "sub"
  with pytest.raises(nnxc.ArtifactError):
    artifact.save(path)


@pytest.mark.parametrize("field", ["demote_f64", "format_version"])
def test_fixed_type_lax_manifest_fields(mlp, field):
  document = json.loads((mlp.directory / "manifest.json").read_text())
  if field == "demote_f64":
    document["target"]["demote_f64"] = 0
  else:
    document["format_version"] = 2.0
  assert _refused(lambda: Manifest.from_json(json.dumps(document))), f"{field} of the wrong JSON type was accepted"


def test_fixed_output_structure_permuted(pair, tmp_path):
  directory = fresh_copy(pair.directory, tmp_path / "pair")
  edit_manifest(directory, lambda m: m["functions"]["pair"].update(structure={"tuple": [{"leaf": 1}, {"leaf": 0}]}))
  if not _refused(lambda: nnxc.load_program(directory)):
    x = pair.calls[0][1][0]
    first, second = nnxc.load_program(directory).pair(x)
    assert np.array_equal(first, pair.reference["outputs"][0][0]), "pair() returns (2y, y) instead of (y, 2y)"


def test_fixed_folder_that_is_a_file(mlp, tmp_path):
  directory = fresh_copy(mlp.directory, tmp_path / "mlp")
  (directory / "spirv").write_bytes(b"")
  edit_manifest(directory, lambda m: m["files"].update({"spirv/x.spv": sha256(b"")}))
  assert _refused(lambda: nnxc.Artifact.open(directory))


@pytest.mark.parametrize("where", ["the target", "a stale temporary"])
def test_fixed_save_hangs_on_a_fifo(mlp, tmp_path, where):
  artifact = nnxc.Artifact.open(mlp.directory)
  if where == "the target":
    os.mkfifo(tmp_path / "art")
  else:
    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)
    os.mkfifo(tmp_path / f".art.tmp-{dead_pid}-fifo01")
  with fifo_watchdog(tmp_path, seconds=3) as watch:
    with contextlib.suppress(nnxc.NnxMetalError):
      artifact.save(tmp_path / "art", overwrite=True)
  assert not watch["hung"], "save() blocked opening a FIFO"


def test_fixed_open_during_a_save(counter_artifact, tmp_path):
  """B15: opens while another process saves into the same directory see the old or the new artifact, whole."""
  directory = _counter_with(counter_artifact, 1, tmp_path / "art")
  script = textwrap.dedent(
    f"""
    import numpy as np
    import compile
    artifact = compile.Artifact.open({str(directory)!r})
    for i in range(40):
      artifact.with_params({{"count": np.array(1 + i % 2, np.int32)}}).save({str(directory)!r})
    """
  )
  saver = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
  seen = set()
  try:
    while saver.poll() is None:
      seen.add(int(nnxc.Artifact.open(directory).params["count"]))
  finally:
    saver.wait(timeout=120)
  assert saver.returncode == 0 and seen <= {1, 2}, (saver.returncode, seen)


# The counts.


def _examples() -> dict:
  """Up to 4 attacks per family and outcome (and per known bug), with what happened."""
  examples: dict = {}
  for row in LEDGER.rows:
    key = f"{row.outcome} {row.bug}" if row.bug else row.outcome
    bucket = examples.setdefault(row.family, {}).setdefault(key, [])
    if len(bucket) < 4:
      bucket.append(f"{row.attack} -> {row.detail[:200]}" if row.detail else row.attack)
  return examples


def test_zz_summary_counts_per_family():
  """Every attack of this module refused or handled, or pinned as a known bug; writes build/reliability.json."""
  counts = LEDGER.counts()
  report = {
    "command": "pytest tests/test_reliability.py",
    "date": time.strftime("%Y-%m-%d"),
    "families": counts,
    "total": {o: sum(c[o] for c in counts.values()) for o in ("attacks", *OUTCOMES)},
    "bugs": {bug: text for bug, text in BUGS.items()},
    "notes": NOTES,
    "examples": _examples(),
  }
  out = REPO / "build" / "reliability.json"
  out.parent.mkdir(exist_ok=True)
  out.write_text(json.dumps(report, indent=1) + "\n")
  unexplained = [r for r in LEDGER.rows if r.outcome in UNEXPLAINED]
  assert not unexplained, "\n".join(f"{r.family} {r.attack}: {r.outcome} {r.detail}" for r in unexplained[:20])
  assert all(c["crashed"] == 0 and c["wrong"] == 0 and c["raw"] == 0 for c in counts.values())
