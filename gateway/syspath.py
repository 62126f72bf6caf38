"""The working directory off `sys.path` before the stack is imported.

`python -m` (and `python -c`) put the working directory first on `sys.path`. Run from a checkout, that makes
the checkout's top-level folders importable under their bare names, and `kernels/` (installed as
`blendgate.kernels`) then shadows Hugging Face's `kernels`, which transformers imports (a dependency of
transformers since 5.25). The installed package never needs the working directory on the path: its folders
are reached as `blendgate.<name>`. pip's own `__main__` drops the working directory for the same reason.
"""

from __future__ import annotations

import os
import sys


def drop_working_directory(path: list[str] | None = None) -> None:
    """Remove every entry of `path` (`sys.path` by default) that names the working directory (`""` or its
    absolute path), in place. `python -m pytest` has pytest put `tests/` in front of the interpreter's entry, so
    the entry is not always first."""
    entries = sys.path if path is None else path
    here = os.getcwd()
    entries[:] = [entry for entry in entries if entry != "" and os.path.abspath(entry) != here]
