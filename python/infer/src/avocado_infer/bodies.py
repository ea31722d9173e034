"""What the request bodies of every API have in common."""

from __future__ import annotations

from typing import Any

__all__ = ["NOT_BLANK"]

# A prompt's schema, in OpenAPI only: the job contract refuses a blank prompt, in its own words.
NOT_BLANK: dict[str, Any] = {"pattern": r"\S"}
