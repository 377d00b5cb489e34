"""Every Python block in docs/*.md runs as written (one namespace per page, in order), so the docs cannot rot."""

import pathlib
import re

import jax
import pytest

DOCS = pathlib.Path(__file__).parent.parent / "docs"
PAGES = sorted(p for p in DOCS.glob("*.md") if "```python" in p.read_text())


def test_the_pages_with_code_are_the_walkthroughs():
  assert {p.stem for p in PAGES} >= {"nnx-basics", "linen", "training", "deploying"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_page_code_runs(page, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # pages may write into build/
  namespace = {}
  with jax.numpy_dtype_promotion("standard"):  # as users run it, not the tests' strict mode
    for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S):
      exec(compile_source(block, page), namespace)


def compile_source(source: str, page: pathlib.Path):
  return compile(source, str(page), "exec")  # the builtin, not our package
