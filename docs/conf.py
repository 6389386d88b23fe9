"""Sphinx configuration of the pyro-vae documentation (built with ``-W`` by ``tests/test_docs.py``)."""

import pyro_vae

project = "pyro-vae"
author = "the pyro-vae developers"
copyright = "2026, the pyro-vae developers"
release = version = pyro_vae.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    # Copies MathJax 3.2.2 (script and fonts) into _static/mathjax and sets mathjax_path to it, so the
    # equations render without a network (sphinx.ext.mathjax alone loads MathJax from a CDN). It does
    # not declare parallel-read safety, so a build with -j N warns, which -W turns into an error.
    "sphinx-mathjax-offline",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]

myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "description"
autodoc_inherit_docstrings = False

html_theme = "sphinx_rtd_theme"
html_title = f"pyro-vae {release}"
html_static_path = []
