"""Summaries of any length: text beyond the context is summarized in parts, then combined."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from avocado_shared.contracts import SummarizeOptions
from ollama_worker.errors import PermanentError
from ollama_worker.inference import Completion

__all__ = [
    "CHARS_PER_TOKEN",
    "chars_per_token",
    "content_budget",
    "split_text",
    "summarize_text",
]

CHARS_PER_TOKEN = 4
"""A cautious estimate for English text; real tokenizers average a little more per token."""

_INSTRUCTION_TOKENS = 256
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_BLANK_LINES = re.compile(r"\n\s*\n")


_SAMPLE_CHARS = 64 * 1024
_MARGIN = 0.9  # a measured average: parts of the text run denser than the whole


class _Generator(Protocol):
    """Any backend's client: a summary needs prompt generation and, where the server has a
    tokenizer endpoint, token counts."""

    def generate(
        self, model: str, prompt: str, *, options: Mapping[str, Any] | None = None
    ) -> Completion: ...

    def count_tokens(self, model: str, text: str) -> int | None: ...


def estimate_tokens(text: str, chars_per_token: float = CHARS_PER_TOKEN) -> int:
    """Tokens ``text`` is likely to take at ``chars_per_token``."""
    return int(len(text) / chars_per_token) + 1


def chars_per_token(client: _Generator, model: str, text: str) -> float:
    """Characters per token of this text in the model's own tokenizer, measured on a sample
    where the server can count, with a margin; the cautious estimate otherwise."""
    sample = text[:_SAMPLE_CHARS]
    counted = client.count_tokens(model, sample) if sample else None
    if not counted:
        return CHARS_PER_TOKEN
    return max(1.0, len(sample) / counted * _MARGIN)


def output_tokens(options: SummarizeOptions) -> int:
    """A cap on a summary's length in tokens, from the words asked for."""
    return options.max_words * 2


def content_budget(num_ctx: int, options: SummarizeOptions) -> int:
    """Tokens of content one call may carry, leaving room for instructions and the answer."""
    budget = num_ctx - _INSTRUCTION_TOKENS - output_tokens(options)
    # Partial summaries must be small enough that several fit one call, or combining never ends.
    if budget < 4 * output_tokens(options):
        raise PermanentError(
            f"max_words={options.max_words} does not fit a {num_ctx}-token context; "
            "ask for fewer words or raise AVOCADO_SUMMARY_NUM_CTX"
        )
    return budget


def _units(text: str, max_chars: int) -> Iterator[str]:
    """Paragraphs, else sentences, else word runs, else hard cuts, each at most ``max_chars``."""
    for paragraph in _BLANK_LINES.split(text):
        paragraph = paragraph.strip()
        if len(paragraph) <= max_chars:
            if paragraph:
                yield paragraph
            continue
        for sentence in _SENTENCE_END.split(paragraph):
            if len(sentence) <= max_chars:
                yield sentence
                continue
            run = ""
            for word in sentence.split():
                while len(word) > max_chars:
                    yield word[:max_chars]
                    word = word[max_chars:]
                if run and len(run) + 1 + len(word) > max_chars:
                    yield run
                    run = word
                else:
                    run = f"{run} {word}" if run else word
            if run:
                yield run


def split_text(text: str, max_tokens: int, chars_per_token: float = CHARS_PER_TOKEN) -> list[str]:
    """Split ``text`` into pieces of at most ``max_tokens`` (at ``chars_per_token``) at
    natural boundaries."""
    max_chars = int(max_tokens * chars_per_token)
    pieces: list[str] = []
    current = ""
    for unit in _units(text, max_chars):
        if current and len(current) + 2 + len(unit) > max_chars:
            pieces.append(current)
            current = unit
        else:
            current = f"{current}\n\n{unit}" if current else unit
    if current:
        pieces.append(current)
    return pieces


def _instructions(options: SummarizeOptions, what: str) -> str:
    shape = "as a bulleted list" if options.style == "bullets" else "as one paragraph"
    language = f" Write in {options.language}." if options.language else ""
    return (
        f"Summarize {what} in at most {options.max_words} words, {shape}. "
        f"Keep names, numbers and conclusions; add nothing that is not in the text.{language}"
    )


def summary_prompt(text: str, options: SummarizeOptions, title: str | None = None) -> str:
    """The prompt for one call over the whole text."""
    heading = f"Title: {title}\n\n" if title else ""
    return f"{_instructions(options, 'the following text')}\n\n{heading}{text}"


def part_prompt(text: str, options: SummarizeOptions, index: int, total: int) -> str:
    """The prompt for part ``index`` of ``total`` of a long text."""
    what = f"part {index} of {total} of a longer text"
    return f"{_instructions(options, what)}\n\n{text}"


def combine_prompt(partials: list[str], options: SummarizeOptions, title: str | None) -> str:
    """The prompt that merges partial summaries into one."""
    heading = f"Title: {title}\n\n" if title else ""
    joined = "\n\n".join(f"Part {i}: {s}" for i, s in enumerate(partials, start=1))
    what = "these summaries of consecutive parts of one text into a single summary"
    return f"{_instructions(options, what)}\n\n{heading}{joined}"


def summarize_text(
    client: _Generator,
    model: str,
    text: str,
    options: SummarizeOptions,
    *,
    num_ctx: int,
    title: str | None = None,
) -> tuple[Completion, int]:
    """Summarize ``text`` within ``num_ctx``; returns the combined completion and the part count."""
    ollama_options: dict[str, Any] = {"num_ctx": num_ctx, "num_predict": output_tokens(options)}
    if options.temperature is not None:
        ollama_options["temperature"] = options.temperature
    budget = content_budget(num_ctx, options)
    density = chars_per_token(client, model, text)
    pieces = split_text(text, budget, density)
    if len(pieces) == 1:
        prompt = summary_prompt(pieces[0], options, title)
        return client.generate(model, prompt, options=ollama_options), 1

    calls: list[Completion] = []
    partials: list[str] = []
    for index, piece in enumerate(pieces, start=1):
        prompt = part_prompt(piece, options, index, len(pieces))
        calls.append(client.generate(model, prompt, options=ollama_options))
        partials.append(calls[-1].text.strip())
    joined = "\n\n".join(partials)
    if estimate_tokens(joined, density) > budget:
        # Too many parts to combine in one call: summarize the partial summaries in turn.
        final, _ = summarize_text(client, model, joined, options, num_ctx=num_ctx, title=title)
    else:
        prompt = combine_prompt(partials, options, title)
        final = client.generate(model, prompt, options=ollama_options)
    return Completion.combine(final.text, [*calls, final]), len(pieces)
