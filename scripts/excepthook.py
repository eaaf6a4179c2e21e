"""Importing this module makes :class:`scripts.errors.BundleInputError` print as one line on stderr.

The bundle configs import it (``$import scripts.excepthook``) so ``python -m monai.bundle run ...``
reports bad input as ``error: <file>: <reason>. Fix: <fix>`` (full traceback with ``--debug``).
"""

from scripts.errors import install_excepthook

install_excepthook()
