"""The inspection report: one self-contained HTML page per artifact.

It shows the model rendered with treescope (as ``nnx.display`` does), the state by
Variable type, a per-variable parity table (eager NNX against the compiled program
after the same calls), and every exported function with its signature, dispatch
count and, for Metal, the MSL source of each of its kernels.
"""

import dataclasses
import html
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import treescope
from flax import nnx

from ._layout import value_of, variable_type_of
from ._lower import call_with_objects, set_mode
from .runtime import Artifact, ArtifactError, Program, path_name

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: left; }
th { background: #f0f0f0; }
td.bad { background: #fdd; }
pre { background: #f7f7f7; padding: 0.5em; overflow-x: auto; font-size: 0.8em; }
section { margin-bottom: 2em; }
"""

# After treescope has rendered into its shadow roots, record what is there on <body>,
# so that a headless browser's --dump-dom shows whether the tree really rendered.
_RENDER_PROBE = """
<script>
const probe = setInterval(() => {
  const text = root => [...root.querySelectorAll("style, script")]
    .reduce((t, s) => t.replace(s.textContent, ""), root.textContent);
  const texts = [...document.querySelectorAll("treescope-container")].map(c => text(c.shadowRoot || c).trim());
  document.body.dataset.treescopeContainers = texts.length;
  document.body.dataset.treescopeText = texts.join(" ").slice(0, 4000);
  if (texts.length && !texts.some(t => t.includes("Loading"))) clearInterval(probe);
}, 100);
</script>
"""


@dataclasses.dataclass(frozen=True)
class Parity:
  """Eager against compiled for one variable or output: max abs and max relative error."""

  name: str
  variable_type: str
  max_abs: float
  max_rel: float


def _errors(got: Any, want: Any) -> tuple[float, float]:
  if jax.dtypes.issubdtype(getattr(want, "dtype", None), jax.dtypes.prng_key):
    got, want = jax.random.key_data(got), jax.random.key_data(want)
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  difference = np.abs(got - want)
  return float(difference.max(initial=0.0)), float((difference / np.maximum(np.abs(want), 1e-30)).max(initial=0.0))


def replay(
  program: Program,
  model: Any,
  calls: Sequence[tuple[str, tuple]],
  functions: dict[str, Callable[..., Any]] | None = None,
) -> list[Parity]:
  """Runs ``calls`` (function name, inputs) on the program and eagerly on ``model``; compares outputs and state.

  ``model`` is what was exported: a module or a dict of objects (``{"model": ..., "optimizer": ...}``).
  Functions exported with :func:`compile.method` are replayed from the manifest; those exported
  with :func:`compile.function` need their Python function in ``functions`` (a call without one
  raises ValueError naming it, rather than being left out of the table).
  """
  functions = functions or {}
  keys = tuple(model) if isinstance(model, dict) else None
  first = next(iter(model.values())) if isinstance(model, dict) else model
  rows = []
  for index, (name, args) in enumerate(calls):
    spec = program.artifact.functions[name]
    if spec.method is None and name not in functions:
      raise ValueError(
        f"Call {index} runs {name}, a compile.function export: pass functions={{{name!r}: fn}} so that the "
        "report can replay it eagerly."
      )
    got = program.functions[name](*args)
    if name in functions:
      want = call_with_objects(model, functions[name], tuple(args), keys)
    else:
      set_mode(first, spec.mode)
      want = getattr(first, spec.method)(*args)
    for leaf, (got_leaf, want_leaf) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)):
      rows.append(Parity(f"call {index}: {name} output {leaf}", "output", *_errors(got_leaf, want_leaf)))
  compiled = dict(nnx.to_flat_state(program.state()))
  for path, variable in nnx.to_flat_state(nnx.state(model)):
    got = value_of(compiled[path])
    rows.append(Parity(path_name(path), variable_type_of(variable), *_errors(got, value_of(variable))))
  return rows


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], row_class: str = "") -> str:
  head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
  body = "".join(f'<tr class="{row_class}">' + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
  return f"<table><tr>{head}</tr>{body}</table>"


def _state_section(artifact) -> str:
  by_type: dict[str, list] = {}
  for variable in artifact.state:
    by_type.setdefault(variable.variable_type, []).append(variable)
  parts = []
  for variable_type, variables in sorted(by_type.items()):
    rows = [
      (html.escape(v.name), html.escape(f"{v.dtype}{list(v.shape)}"), html.escape(v.global_name)) for v in variables
    ]
    parts.append(f"<h3>{html.escape(variable_type)} ({len(variables)})</h3>" + _table(["path", "type", "global"], rows))
  return "".join(parts)


def _parity_section(parity: list[Parity] | None, tolerance: float) -> str:
  if parity is None:
    return (
      "<p>No eager model was given, so nothing was compared (pass <code>model=</code> and <code>calls=</code>).</p>"
    )
  rows = []
  for p in parity:
    mark = ' class="bad"' if p.max_abs > tolerance else ""
    rows.append(
      (html.escape(p.name), html.escape(p.variable_type), f"<span{mark}>{p.max_abs:.3g}</span>", f"{p.max_rel:.3g}")
    )
  return _table(["variable or output", "kind", "max abs error", "max rel error"], rows, row_class="parity")


def _functions_section(artifact) -> str:
  parts = []
  for name, spec in artifact.functions.items():
    parts.append(
      f"<h3>{html.escape(name)}</h3><p><code>{html.escape(spec.signature())}</code><br>"
      f"{spec.dispatch_count} kernel launches per call (a loop whose trip count is known only at run time "
      "counts once); "
      f"writes back {len(spec.updates)} state variables: "
      f"{html.escape(', '.join(spec.updates) or 'none')}</p>"
    )
    for executable in spec.executables:
      source = artifact.files.get(f"msl/{executable}.metal")
      if source is not None:
        summary = f"<summary>MSL of {html.escape(executable)}</summary>"
        parts.append(f"<details>{summary}<pre>{html.escape(source.decode(errors='replace'))}</pre></details>")
  return "".join(parts)


def _saved_state(artifact: Artifact) -> Any:
  """The artifact's state as an nnx.State, or as arrays by path where a Variable type is not registered here."""
  try:
    return artifact.saved_state()
  except ArtifactError:
    return {v.name: artifact.params[v.global_name] for v in artifact.state}


def _versions(versions: dict[str, str]) -> str:
  return ", ".join(f"{name} {version}" for name, version in sorted(versions.items()))


def write_report(
  artifact: Artifact,
  path: str | pathlib.Path,
  *,
  program: Program | None = None,
  model: Any = None,
  calls: Sequence[tuple[str, tuple]] = (),
  functions: dict[str, Callable[..., Any]] | None = None,
  tolerance: float = 1e-4,
) -> pathlib.Path:
  """Writes the HTML report of ``artifact`` to ``path``.

  Args:
    artifact: what to report: functions, dispatches, MSL, state layout.
    path: the ``.html`` file to write.
    program: the artifact (or its twin for a device this machine has) loaded, to replay ``calls`` on.
    model: the eager objects to compare with (a module or the dict of objects that was exported), in
      the state the artifact was exported from; rendered with treescope (else the artifact's saved state is).
    calls: ``(function name, inputs)`` run on ``program`` and eagerly on ``model`` before comparing.
    functions: ``{name: fn}`` of the :func:`compile.function` exports among ``calls``, to replay them eagerly.
    tolerance: max abs error above which a parity cell is highlighted.
  """
  parity = replay(program, model, calls, functions) if model is not None and program is not None else None
  rendered = treescope.render_to_html(model if model is not None else _saved_state(artifact), compressed=False)
  manifest = artifact.manifest
  title = f"{manifest.model} for {manifest.target.name}"
  body = [
    f"<h1>{html.escape(title)}</h1>",
    f"<p>{html.escape(_versions(manifest.versions))}; flags <code>{html.escape(' '.join(manifest.flags))}</code>; "
    f"SPIR-V race check: {html.escape(manifest.hazard_check)}</p>",
    f'<section id="model"><h2>Model</h2>{rendered}</section>',
    f'<section id="state"><h2>State by Variable type</h2>{_state_section(artifact)}</section>',
    f'<section id="parity"><h2>Parity: eager against compiled</h2>{_parity_section(parity, tolerance)}</section>',
    f'<section id="functions"><h2>Functions</h2>{_functions_section(artifact)}</section>',
  ]
  page = (
    f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
    f"<style>{_STYLE}</style></head><body>{''.join(body)}{_RENDER_PROBE}</body></html>"
  )
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(page)
  tmp.replace(path)  # atomic: a reader never sees half a report
  return path
