"""What the request bodies of every API have in common."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

__all__ = ["NOT_BLANK", "ToolCallBody"]

# A prompt's schema, in OpenAPI only: the job contract refuses a blank prompt, in its own words.
NOT_BLANK: dict[str, Any] = {"pattern": r"\S"}


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    arguments: dict[str, Any] | str = "{}"


class ToolCallBody(BaseModel):
    """A call in an assistant turn of the history, as either API's clients send it back:
    what the answer said (Ollama's ``function.index`` included) is taken, only the call kept."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction
