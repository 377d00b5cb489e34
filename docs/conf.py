"""Sphinx configuration: `nox -s docs` builds docs/ into build/docs with MyST markdown, offline."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent))  # nnx_models and compile, for autodoc

project = "nnx-metal"
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["examples"]
html_theme = "alabaster"
autodoc_member_order = "bysource"
autodoc_typehints = "description"
myst_heading_anchors = 3
suppress_warnings = ["myst.xref_missing"]
