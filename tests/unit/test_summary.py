"""Splitting long content so each call fits the model's context."""

from __future__ import annotations

import pytest

from avocado_shared import SummarizeOptions
from ollama_worker.errors import PermanentError
from ollama_worker.summary import CHARS_PER_TOKEN, content_budget, split_text


def test_short_text_is_one_piece() -> None:
    assert split_text("one. two.", 100) == ["one. two."]


@pytest.mark.parametrize(
    "text",
    [
        "\n\n".join(f"Paragraph {i} " + "word " * 50 for i in range(30)),
        " ".join(f"Sentence number {i} ends here." for i in range(400)),
        "x" * 5000,
        "a " * 3000,
    ],
    ids=["paragraphs", "sentences", "one-long-word", "words"],
)
def test_every_piece_fits_and_nothing_is_lost(text: str) -> None:
    pieces = split_text(text, 100)

    assert len(pieces) > 1
    assert all(len(p) <= 100 * CHARS_PER_TOKEN for p in pieces)
    assert "".join("".join(pieces).split()) == "".join(text.split())


def test_paragraph_boundaries_are_preferred() -> None:
    text = "A" * 300 + "\n\n" + "B" * 300 + "\n\n" + "C" * 300

    assert split_text(text, 100) == ["A" * 300, "B" * 300, "C" * 300]


def test_budget_leaves_room_for_the_answer() -> None:
    options = SummarizeOptions(max_words=100)

    assert content_budget(4096, options) == 4096 - 256 - 200


def test_too_many_words_for_the_context_is_a_permanent_error() -> None:
    with pytest.raises(PermanentError, match="AVOCADO_SUMMARY_NUM_CTX"):
        content_budget(2048, SummarizeOptions(max_words=1000))
