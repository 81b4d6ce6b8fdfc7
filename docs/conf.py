"""Sphinx configuration of the documentation site (`sphinx-build -W -b html docs docs/_build/html`).

The pages are MyST Markdown; the API reference is generated from the docstrings. tests/test_docs.py
builds the site with warnings as errors, so a broken link, a missing page or a renamed function
fails the tests.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the checkout, not an installed copy, is what the pages describe
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # autodoc imports jax; the site needs no accelerator

import ge2mst_jax  # noqa: E402

project = "ge2mst_jax"
author = "ge2mst_jax contributors"
copyright = "ge2mst_jax contributors, Apache License 2.0"  # noqa: A001 (Sphinx's name)
release = version = ge2mst_jax.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3  # `page.md#a-heading` links, the same slugs GitHub renders

autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "description"
autodoc_mock_imports = []
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "sphinx_book_theme"
html_title = f"ge2mst_jax {release}"
html_theme_options = {"show_toc_level": 2}
