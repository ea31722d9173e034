"""A fake ngrok agent to hand to pyngrok, so tunnels work with no ngrok account and no
internet: test harness, never shipped in a wheel."""

from __future__ import annotations

from tests.fake_ngrok.agent import VERSION
from tests.fake_ngrok.launcher import fake_ngrok_path

__all__ = ["VERSION", "fake_ngrok_path"]
