"""Sphinx configuration for histoexp."""

import os
from datetime import date
from importlib.metadata import version as _version

project = "histoexp"
author = "histoexp developers"
copyright = f"{date.today().year}, {author}"
release = _version("histoexp")
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx_autodoc_typehints",
]
# Inventories are fetched from the internet: only where the docs are published (Read the Docs).
if os.environ.get("READTHEDOCS"):
    extensions.append("sphinx.ext.intersphinx")
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
        "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
        "squidpy": ("https://squidpy.readthedocs.io/en/stable/", None),
        "numpy": ("https://numpy.org/doc/stable/", None),
        "torch": ("https://docs.pytorch.org/docs/stable/", None),
    }

autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
typehints_use_signature = False
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
napoleon_use_param = True
always_document_param_types = False
nitpicky = False

myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3
# The notebooks live in the top-level tutorials/ folder (docs/tutorials is a link to it) and are stored with their
# outputs: rendered, never executed by the docs build.
nb_execution_mode = "off"
nb_merge_streams = True

templates_path = ["_templates"]
html_static_path = ["_static"]
html_css_files = ["custom.css"]  # code lines wrap
exclude_patterns = ["_build", "**.ipynb_checkpoints", "jupyter_execute"]
suppress_warnings = ["myst.header", "mystnb.unknown_mime_type"]

html_theme = "sphinx_book_theme"
html_title = "histoexp"
html_theme_options = {
    "repository_url": "https://github.com/histoexp/histoexp",
    "use_repository_button": True,
}
