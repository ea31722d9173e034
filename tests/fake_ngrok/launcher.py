"""The fake agent as an executable file, since pyngrok runs its agent from a path: a script
that runs `agent.main` with this interpreter, written once per interpreter and checkout."""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from functools import cache
from pathlib import Path

__all__ = ["fake_ngrok_path"]

_ROOT = Path(__file__).resolve().parents[2]
_SCRIPT = """#!{python}
import sys
sys.path.insert(0, {root!r})
from tests.fake_ngrok.agent import main
raise SystemExit(main())
"""


@cache
def fake_ngrok_path() -> str:
    """The fake agent's executable, to pass as ``PyngrokConfig(ngrok_path=...)``."""
    text = _SCRIPT.format(python=sys.executable, root=str(_ROOT))
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"avocado-fake-ngrok-{digest}" / "ngrok"
    if not path.exists():
        # Test processes start at once: each writes its own file, then renames it into place.
        path.parent.mkdir(exist_ok=True)
        mine = path.with_name(f"ngrok.{os.getpid()}")
        mine.write_text(text)
        mine.chmod(0o755)
        mine.replace(path)
    return str(path)
