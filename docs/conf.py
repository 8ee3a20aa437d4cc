"""Sphinx configuration of the optax_guard documentation.

Built like optax's: sphinx-book-theme, MyST Markdown pages whose code cells
myst-nb executes at build time (a cell that raises fails the build), and an
API reference generated from the docstrings by autodoc and autosummary.
Everything builds offline on CPU:

    pip install -e ".[docs]"
    sphinx-build -q -W --keep-going -b html docs docs/_build/html

(``-q``: only warnings and errors in the log.)
"""

import atexit
import os
import pathlib
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.abspath('..'))

import optax_guard  # pylint: disable=g-import-not-at-top,wrong-import-position

project = 'optax_guard'
author = 'The optax_guard authors'
copyright = '2026, The optax_guard authors'  # pylint: disable=redefined-builtin
release = optax_guard.__version__
version = release

extensions = [
    'myst_nb',
    'sphinx.ext.autodoc',
    'sphinx.ext.autosummary',
    'sphinx.ext.napoleon',
    'sphinx.ext.viewcode',
]

exclude_patterns = ['_build', 'Thumbs.db', '.DS_Store', '**.ipynb_checkpoints']
source_suffix = {'.rst': 'restructuredtext', '.md': 'myst-nb'}
root_doc = 'index'

# -- API reference ------------------------------------------------------------
autosummary_generate = False  # the reference pages list their members by hand.
autodoc_default_options = {'member-order': 'bysource'}
autodoc_typehints = 'signature'
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# `Attributes:` as fields of the class, not as separate attribute entries that
# would duplicate the NamedTuple fields autodoc already knows.
napoleon_use_ivar = True

# -- Executed pages -----------------------------------------------------------
# Every code cell runs on each build: a guide whose code no longer matches the
# API fails the build instead of going stale.
nb_execution_mode = 'force'
nb_execution_raise_on_error = True
nb_execution_timeout = 180
nb_execution_show_tb = True
nb_merge_streams = True
# The build log and the pages show what the code says, not the tools'
# chatter: the kernels start from an IPython profile made for this build, in
# which ipykernel logs errors only (not its notice that it talks over local
# TCP) and absl's loggers (Orbax's option notices) warnings no more.
_ipython_dir = pathlib.Path(tempfile.mkdtemp(prefix='optax_guard_docs_'))
atexit.register(shutil.rmtree, _ipython_dir, ignore_errors=True)
(_ipython_dir / 'profile_default' / 'startup').mkdir(parents=True)
(_ipython_dir / 'profile_default' / 'ipython_kernel_config.py').write_text(
    "c.IPKernelApp.log_level = 'ERROR'\n")
(_ipython_dir / 'profile_default' / 'startup' / '00_quiet.py').write_text(
    "import logging\nlogging.getLogger('absl').setLevel(logging.ERROR)\n")
os.environ['IPYTHONDIR'] = str(_ipython_dir)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # No accelerator probing.
myst_enable_extensions = ['colon_fence', 'deflist']
myst_heading_anchors = 3

# -- HTML ---------------------------------------------------------------------
html_theme = 'sphinx_book_theme'
html_title = f'optax_guard {release}'
html_theme_options = {
    'show_toc_level': 2,
    'navigation_with_keys': False,
}
