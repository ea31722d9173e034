"""httpx without its command line in a worker.

httpx 0.28 imports its command line (``httpx._main``: click, rich, pygments) on first import
whenever they are installed, as on Colab and Kaggle: some 8 MB in every worker process, never
used. Marked absent before httpx is first imported, httpx takes the stub ``main`` it has for
an install without them.
"""

from __future__ import annotations

import sys

__all__ = ["leave_out"]


def leave_out() -> None:
    """Keep ``httpx._main`` from loading (call before httpx is first imported)."""
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
