"""Job contracts: what a producer may send and what a worker returns, validated at both ends."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from enum import Enum
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from avocado_shared.errors import PermanentError

__all__ = [
    "ChatMessage",
    "EmbedRequest",
    "EmbedResult",
    "GenerateRequest",
    "GenerateResult",
    "InvalidRequest",
    "JobKind",
    "JobResult",
    "SummarizeContent",
    "SummarizeOptions",
    "SummarizeRequest",
    "SummarizeResult",
    "Usage",
    "parse_result",
    "validate_request",
]

NonEmpty = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
Identifier = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200, pattern=r"^\S+$")
]
# A model's name is part of its queue's name and binding: no wildcard of a topic exchange.
ModelName = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=200, pattern=r"^[^\s#*]+$"),
]
OptionValue = int | float | str | bool | list[str]
_Model = TypeVar("_Model", bound=BaseModel)


class JobKind(str, Enum):
    """The kinds of job; also the ``kind`` field of every result."""

    GENERATE = "generate"
    SUMMARIZE = "summarize"
    EMBED = "embed"


class InvalidRequest(PermanentError, ValueError):
    """A request that breaks its contract; refused before anything is published."""

    exit_code: ClassVar[int] = 2

    @classmethod
    def from_validation(cls, what: str, error: ValidationError) -> InvalidRequest:
        """Turn pydantic's report into one line a user can act on."""
        parts = []
        for item in error.errors():
            where = ".".join(str(p) for p in item["loc"]) or what
            parts.append(f"{where}: {item['msg']}")
        return cls(f"invalid {what} request: " + "; ".join(parts))


class _Contract(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ChatMessage(_Contract):
    """One chat turn, as Ollama's ``/api/chat`` takes it."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str
    images: list[str] | None = None


class GenerateRequest(_Contract):
    """A prompt (``/api/generate``) or a chat (``/api/chat``) generation job."""

    prompt: NonEmpty | None = None
    messages: list[ChatMessage] | None = None
    system: str | None = None
    model: ModelName | None = Field(default=None, description="The worker's default when unset.")
    options: dict[str, OptionValue] = Field(default_factory=dict)
    format: Literal["json"] | dict[str, Any] | None = Field(
        default=None, description='"json" or a JSON schema the answer must follow.'
    )
    keep_alive: str | int | None = None
    idempotency_key: Identifier | None = None

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.messages is not None and not self.messages:
            raise ValueError("messages must not be empty")
        return self

    @field_validator("format")
    @classmethod
    def _schema_is_object(cls, value: Any) -> Any:
        if isinstance(value, dict) and "type" not in value:
            raise ValueError('a JSON schema format needs a "type"')
        return value

    @property
    def is_chat(self) -> bool:
        """True when the job goes to ``/api/chat``."""
        return self.messages is not None


class SummarizeContent(BaseModel):
    """The shared item to summarize; ``text`` is required, other metadata is kept out."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    text: NonEmpty
    title: str | None = None
    url: str | None = None


class SummarizeOptions(_Contract):
    """How the summary should look."""

    max_words: int = Field(default=150, ge=10, le=2000)
    language: str | None = Field(default=None, max_length=50)
    model: ModelName | None = None
    style: Literal["paragraph", "bullets"] = "paragraph"
    temperature: float | None = Field(default=None, ge=0, le=2)


class SummarizeRequest(_Contract):
    """Summarize one shared item; at most one such job per ``share_id`` runs at once."""

    share_id: Identifier
    content: SummarizeContent
    options: SummarizeOptions = Field(default_factory=SummarizeOptions)


class EmbedRequest(_Contract):
    """Embed one text or a list (one job, sent to the server in batches it takes); with a
    ``share_id``, the embedding of that shared item: at most one such job runs at once, and
    its row in ``ml_results`` is the item's."""

    input: NonEmpty | list[NonEmpty] = Field(min_length=1)
    model: ModelName | None = Field(default=None, description="The fleet's embed_model when unset.")
    share_id: Identifier | None = None
    dimensions: int | None = Field(
        default=None, ge=1, description="Cut each vector to this many, then scale it to length 1."
    )
    truncate: bool = Field(
        default=True, description="Cut a text longer than the model's context; false: fail."
    )
    options: dict[str, OptionValue] = Field(default_factory=dict)
    keep_alive: str | int | None = None
    idempotency_key: Identifier | None = None

    @property
    def texts(self) -> list[str]:
        """The input as a list."""
        return [self.input] if isinstance(self.input, str) else list(self.input)


class Usage(BaseModel):
    """What an answer cost: its model, why it ended, its token counts and its durations, all
    in milliseconds. One shape from the worker's server call to the token stream, the result,
    ``ml_results`` and the gateway's metrics; an API that counts in other units (Ollama's
    nanoseconds) converts at its own edge."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    model: str
    done_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_duration_ms: float = 0.0
    load_duration_ms: float = 0.0
    prompt_eval_duration_ms: float = 0.0
    eval_duration_ms: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """Generation speed as the server measured it; 0 when it did not."""
        if self.eval_duration_ms <= 0:
            return 0.0
        return self.completion_tokens / (self.eval_duration_ms / 1000)

    @classmethod
    def total(cls, parts: Sequence[Usage]) -> Usage:
        """One usage standing for several calls (a chunked summary): counts and durations add
        up; the model and the reason are the last call's."""
        last = parts[-1]
        added = (name for name in Usage.model_fields if name not in _FROM_LAST)
        return cls(
            model=last.model,
            done_reason=last.done_reason,
            **{name: sum(getattr(p, name) for p in parts) for name in added},
        )

    def usage(self) -> Usage:
        """Only the usage (of a result, which is one and more)."""
        return Usage.model_validate(self.model_dump(include=set(Usage.model_fields)))


# What a total takes from the last call; every other field of a usage adds up.
_FROM_LAST = ("model", "done_reason")


class JobResult(Usage):
    """What every finished job reports: the model's answer plus its ``Usage``."""

    kind: JobKind
    job_id: str
    worker: str
    finished_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))


class GenerateResult(JobResult):
    """The text (or JSON text) a generation produced."""

    kind: Literal[JobKind.GENERATE] = JobKind.GENERATE
    text: str


class SummarizeResult(JobResult):
    """The summary of one shared item; ``chunks`` > 1 when it was summarized in parts."""

    kind: Literal[JobKind.SUMMARIZE] = JobKind.SUMMARIZE
    share_id: str
    summary: str
    chunks: int = 1


class EmbedResult(JobResult):
    """One vector per input text, in the input's order; ``share_id`` when it embeds a shared
    item."""

    kind: Literal[JobKind.EMBED] = JobKind.EMBED
    embeddings: list[list[float]]
    share_id: str | None = None


def parse_result(data: dict[str, Any]) -> GenerateResult | SummarizeResult | EmbedResult:
    """Read a stored result back into its model, by its ``kind``."""
    if data.get("kind") == JobKind.SUMMARIZE.value:
        return SummarizeResult.model_validate(data)
    if data.get("kind") == JobKind.EMBED.value:
        return EmbedResult.model_validate(data)
    return GenerateResult.model_validate(data)


def validate_request(model: type[_Model], data: Any) -> _Model:
    """Validate ``data`` against a contract, raising ``InvalidRequest`` with a readable reason."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        what = model.__name__.removesuffix("Request").lower()
        raise InvalidRequest.from_validation(what, error) from None
