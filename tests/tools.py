"""A function tool the tool-call tests offer the model, in the shape chat takes (OpenAI's and
Ollama's)."""

from __future__ import annotations

from typing import Any

__all__ = ["WEATHER"]

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
