"""Deterministic fake model output for the Ollama simulator.

Every reply is a pure function of the request, so a test can compute what the
simulator will say; a "token" is one word (or one JSON piece).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Reply", "continuation", "count_words", "plan_chat", "plan_reply", "reply_key"]

_WORDS = (
    "the", "avocado", "river", "bright", "garden", "silver", "morning", "quiet",
    "harbor", "lantern", "meadow", "copper", "gentle", "window", "orchard", "signal",
    "steady", "cloud", "pepper", "spicy", "marble", "north", "autumn", "bridge",
    "simple", "careful", "engine", "forest", "golden", "honest", "island", "journey",
    "kettle", "ladder", "mirror", "needle", "ocean", "pocket", "quartz", "rocket",
    "saddle", "timber", "umbrella", "velvet", "wander", "yellow", "zephyr", "answer",
    "basket", "candle", "desert", "ember", "feather", "glacier", "hollow", "ivory",
    "jasmine", "kindle", "lemon", "maple", "nectar", "olive", "pebble", "quill",
    "ribbon", "summit", "tunnel", "upland", "valley", "willow", "anchor", "beacon",
    "cedar", "dune", "echo", "fable", "grove", "horizon", "inlet", "jade",
    "keel", "lagoon", "mosaic", "nimbus", "oasis", "prairie", "quarry", "reef",
    "sparrow", "tide", "urchin", "vessel", "wharf", "yarrow", "amber", "breeze",
    "canyon", "delta", "estuary", "fjord", "granite", "heron", "iris", "juniper",
    "kelp", "lichen", "mango", "nutmeg", "opal", "plume", "quince", "rain",
    "sage", "thistle", "umber", "vine", "walnut", "yonder", "acorn", "bramble",
    "clover", "dawn", "elm", "fern", "gourd", "hazel", "ink", "jetty",
)  # fmt: skip
_SENTENCE = 9  # words per sentence before a full stop
_PIECE = re.compile(r"\s*\S+")
_MAX_DEPTH = 8


@dataclass
class Reply:
    """What the fake model answers: content tokens, or tool calls with no content."""

    tokens: list[str]
    done_reason: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    eval_count: int = 0


def reply_key(*parts: object) -> bytes:
    """Stable seed bytes for a request; only the parts that change the answer."""
    return json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False).encode()


def count_words(*texts: object) -> int:
    """Whitespace-token count: the simulator's idea of a prompt's length."""
    return sum(len(t.split()) for t in texts if isinstance(t, str))


def _words(key: bytes) -> Iterator[str]:
    digest = hashlib.blake2b(key, digest_size=64).digest()
    while True:
        for byte in digest:
            yield _WORDS[byte % len(_WORDS)]
        digest = hashlib.blake2b(digest, digest_size=64).digest()


def _sentence_tokens(words: Iterator[str], count: int, finish: bool) -> list[str]:
    tokens: list[str] = []
    capital = True
    for i in range(count):
        word = next(words)
        if capital:
            word = word.capitalize()
        capital = i % _SENTENCE == _SENTENCE - 1 or (finish and i == count - 1)
        if capital:
            word += "."
        tokens.append(word if i == 0 else " " + word)
    return tokens


def _cut_at_stop(tokens: list[str], stops: Sequence[str]) -> list[str] | None:
    """Tokens before the earliest stop sequence, or None when no stop matches."""
    text = "".join(tokens)
    hits = [text.find(s) for s in stops if isinstance(s, str) and s]
    hits = [h for h in hits if h >= 0]
    if not hits:
        return None
    end, kept, used = min(hits), [], 0
    for tok in tokens:
        if used + len(tok) > end:
            if end > used:
                kept.append(tok[: end - used])
            break
        kept.append(tok)
        used += len(tok)
    return kept


def plan_reply(
    key: bytes,
    *,
    fmt: Any,
    num_predict: int | None,
    default_tokens: int,
    stop: Sequence[str] | None = None,
    tool: Mapping[str, Any] | None = None,
    images: int = 0,
) -> Reply:
    """Decide the whole answer up front; streaming only slices it. A text answer to a request
    that shows ``images`` begins by saying how many it saw, so tests see they arrived."""
    words = _words(key)
    if tool is not None:
        fn: Mapping[str, Any] = (
            tool["function"] if isinstance(tool.get("function"), Mapping) else tool
        )
        params = fn.get("parameters")
        schema: Mapping[str, Any] = params if isinstance(params, Mapping) else {}
        arguments = _fill(schema, schema, words, 0)
        call = {
            "id": "call_" + hashlib.blake2b(key, digest_size=4).hexdigest(),
            "function": {
                "index": 0,
                "name": str(fn.get("name") or "tool"),
                "arguments": arguments if isinstance(arguments, dict) else {},
            },
        }
        used = len(json.dumps(call["function"]).split())
        return Reply(tokens=[], done_reason="stop", tool_calls=[call], eval_count=used)
    limit = num_predict if isinstance(num_predict, int) and num_predict >= 0 else None
    if fmt == "json" or isinstance(fmt, Mapping):
        value = (
            _fill(fmt, fmt, words, 0)
            if isinstance(fmt, Mapping)
            else {"answer": "".join(_sentence_tokens(words, 8, True))}
        )
        tokens = _PIECE.findall(json.dumps(value, ensure_ascii=False))
        reason = "stop"
        if limit is not None and limit < len(tokens):
            tokens, reason = tokens[:limit], "length"  # real Ollama truncates too
        return Reply(tokens=tokens, done_reason=reason, eval_count=len(tokens))
    count = default_tokens if limit is None else limit
    seen = _PIECE.findall(f"I see {images} image{'' if images == 1 else 's'}. ") if images else []
    tokens = (seen + _sentence_tokens(words, count, finish=limit is None))[:count]
    if seen and len(tokens) > len(seen):
        tokens[len(seen)] = " " + tokens[len(seen)]
    reason = "stop" if limit is None else "length"
    if stop:
        cut = _cut_at_stop(tokens, stop)
        if cut is not None:
            tokens, reason = cut, "stop"
    return Reply(tokens=tokens, done_reason=reason, eval_count=len(tokens))


def continuation(reply: Reply, partial: str) -> Reply | None:
    """The rest of ``reply`` once ``partial``, its start, was given (a partial ending inside
    a token gets that token's rest first); None when the answer does not start with it."""
    if reply.tool_calls or not "".join(reply.tokens).startswith(partial):
        return None
    rest: list[str] = []
    used = 0
    for token in reply.tokens:
        if used + len(token) > len(partial):
            rest.append(token[max(0, len(partial) - used) :])
        used += len(token)
    return Reply(tokens=rest, done_reason=reply.done_reason, eval_count=len(rest))


def plan_chat(
    model: str,
    messages: Sequence[tuple[Any, Any]],
    *,
    seed: Any = None,
    continue_last: bool,
    num_predict: int | None,
    **plan: Any,
) -> Reply:
    """The answer to a chat of ``(role, content)`` pairs (a prompt is the chat of its system
    and user messages, as Ollama renders ``/api/generate``).

    With ``continue_last`` and a trailing assistant message, the model continues that
    message: the rest of the answer it began, ``num_predict`` counting new tokens only (as
    real servers do). A trailing message the answer does not begin with gets an answer of
    its own. ``plan``: ``plan_reply``'s other arguments.
    """
    last = messages[-1] if messages else None
    if continue_last and last is not None and last[0] == "assistant" and last[1]:
        partial = str(last[1])
        limit = num_predict
        if isinstance(limit, int) and limit >= 0:
            limit += len(partial.split())  # a simulated token is a word
        whole = plan_reply(_chat_key(model, messages[:-1], seed), num_predict=limit, **plan)
        rest = continuation(whole, partial)
        if rest is not None:
            return rest
    return plan_reply(_chat_key(model, messages, seed), num_predict=num_predict, **plan)


def _chat_key(model: str, messages: Sequence[tuple[Any, Any]], seed: Any) -> bytes:
    key = reply_key(model, [list(m) for m in messages])
    return key if seed is None else key + str(seed).encode()


def _resolve(ref: str, root: Mapping[str, Any]) -> Mapping[str, Any]:
    node: Any = root
    for part in ref.lstrip("#/").split("/"):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node if isinstance(node, Mapping) else {}


def _fill(schema: Any, root: Mapping[str, Any], words: Iterator[str], depth: int) -> Any:
    """A value matching a JSON schema, plausible rather than exhaustive."""
    if not isinstance(schema, Mapping) or depth > _MAX_DEPTH:
        return None
    if isinstance(schema.get("$ref"), str):
        return _fill(_resolve(schema["$ref"], root), root, words, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for combo in ("anyOf", "oneOf"):
        options = schema.get(combo)
        if isinstance(options, list) and options:
            usable = [
                o for o in options if not (isinstance(o, Mapping) and o.get("type") == "null")
            ]
            return _fill((usable or options)[0], root, words, depth + 1)
    if isinstance(schema.get("allOf"), list):
        merged: dict[str, Any] = {"type": "object", "properties": {}, "required": []}
        for part in schema["allOf"]:
            part = (
                _resolve(part["$ref"], root)
                if isinstance(part, Mapping) and "$ref" in part
                else part
            )
            if isinstance(part, Mapping):
                merged["properties"].update(part.get("properties") or {})
                merged["required"] += list(part.get("required") or [])
        return _fill(merged, root, words, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind == "object":
        props = schema.get("properties") or {}
        names = list(props) + [r for r in schema.get("required") or [] if r not in props]
        return {n: _fill(props.get(n, {"type": "string"}), root, words, depth + 1) for n in names}
    if kind == "array":
        low = int(schema.get("minItems", 1))
        high = int(schema.get("maxItems", max(low, 2)))
        return [
            _fill(schema.get("items", {}), root, words, depth + 1)
            for _ in range(min(max(low, 1), high))
        ]
    if kind == "integer":
        return _number(schema, words, integer=True)
    if kind == "number":
        return _number(schema, words, integer=False)
    if kind == "boolean":
        return len(next(words)) % 2 == 0
    if kind == "null":
        return None
    return _string(schema, words)


def _number(schema: Mapping[str, Any], words: Iterator[str], *, integer: bool) -> int | float:
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum", schema.get("exclusiveMaximum"))
    low = low if isinstance(low, (int, float)) else 0
    high = high if isinstance(high, (int, float)) and high >= low else low + 100
    span = high - low
    value = low + (len(next(words)) * 7 % 10) / 10 * span
    if "exclusiveMinimum" in schema and value <= low:
        value = low + (1 if integer else span / 2)
    return int(value) if integer else round(float(value), 2)


_FORMATS = {
    "date": "2024-05-17",
    "date-time": "2024-05-17T12:00:00Z",
    "time": "12:00:00",
    "email": "avocado@example.com",
    "uri": "https://example.com/avocado",
    "uuid": "123e4567-e89b-42d3-a456-426614174000",
}


def _string(schema: Mapping[str, Any], words: Iterator[str]) -> str:
    fmt = schema.get("format")
    if isinstance(fmt, str) and fmt in _FORMATS:
        return _FORMATS[fmt]
    text = " ".join(next(words) for _ in range(3))
    low, high = schema.get("minLength"), schema.get("maxLength")
    if isinstance(low, int):
        while len(text) < low:
            text += " " + next(words)
    if isinstance(high, int):
        text = text[:high]
    return text
