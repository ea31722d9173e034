"""Job contracts: what a producer may send and what a worker returns, validated at both ends."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from datetime import datetime, timezone
from enum import Enum
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    AfterValidator,
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
    "FunctionCall",
    "FunctionSpec",
    "GenerateRequest",
    "GenerateResult",
    "InvalidRequest",
    "JobKind",
    "JobResult",
    "NamedTool",
    "SummarizeContent",
    "SummarizeOptions",
    "SummarizeRequest",
    "SummarizeResult",
    "Tool",
    "ToolCall",
    "ToolChoice",
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


def _base64(value: str) -> str:
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("an image must be base64 data, without a data: URL prefix") from None
    if not value:
        raise ValueError("an image must not be empty")
    return value


# An image as Ollama's API carries it: the file's bytes in base64.
Image = Annotated[str, AfterValidator(_base64)]
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


class FunctionSpec(_Contract):
    """A function the model may call: its name, what it does, its arguments' JSON schema."""

    name: Identifier
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Contract):
    """A tool offered to the model (OpenAI's and Ollama's shape; functions are the only kind
    both APIs and every backend take)."""

    type: Literal["function"] = "function"
    function: FunctionSpec


class FunctionCall(_Contract):
    """A call's function and its arguments as JSON text (OpenAI's form: what a server
    streamed, kept byte for byte; Ollama's object is written as JSON)."""

    name: str
    arguments: str = "{}"

    @field_validator("arguments", mode="before")
    @classmethod
    def _as_json_text(cls, value: Any) -> Any:
        return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else value


class ToolCall(_Contract):
    """One call the model made; ``id`` links the tool's result (``tool_call_id``) to it."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionName(_Contract):
    name: str


class NamedTool(_Contract):
    """A ``tool_choice`` that names the function the model must call."""

    type: Literal["function"] = "function"
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedTool


class ChatMessage(_Contract):
    """One chat turn, as Ollama's ``/api/chat`` takes it, with the calls an assistant made
    (``tool_calls``) and, in a ``tool`` turn, which call it answers (``tool_call_id``,
    OpenAI's link; ``tool_name``, Ollama's)."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str
    images: list[Image] | None = Field(default=None, description="Base64 images it shows.")
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    tool_name: str | None = None

    @field_validator("tool_calls")
    @classmethod
    def _calls_are_whole(cls, calls: list[ToolCall] | None) -> list[ToolCall] | None:
        """A call in the history names its function, its arguments a JSON object: what
        every server takes (Ollama's API takes no other)."""
        for call in calls or []:
            if not call.function.name.strip():
                raise ValueError("a tool call needs its function's name")
            try:
                arguments = json.loads(call.function.arguments)
            except ValueError:
                arguments = None
            if not isinstance(arguments, dict):
                raise ValueError(
                    f"the arguments of the call to {call.function.name!r} must be a JSON object"
                )
        return calls


class GenerateRequest(_Contract):
    """A prompt (``/api/generate``) or a chat (``/api/chat``) generation job."""

    prompt: NonEmpty | None = None
    messages: list[ChatMessage] | None = None
    system: str | None = None
    images: list[Image] | None = Field(
        default=None, description="Base64 images the prompt shows (a chat's go in its messages)."
    )
    model: ModelName | None = Field(default=None, description="The worker's default when unset.")
    options: dict[str, OptionValue] = Field(default_factory=dict)
    format: Literal["json"] | dict[str, Any] | None = Field(
        default=None, description='"json" or a JSON schema the answer must follow.'
    )
    keep_alive: str | int | None = None
    idempotency_key: Identifier | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.messages is not None and not self.messages:
            raise ValueError("messages must not be empty")
        if self.messages is not None and self.images:
            raise ValueError("a chat's images go in its messages")
        return self

    @model_validator(mode="after")
    def _tools_in_a_chat(self) -> GenerateRequest:
        if self.tools is not None and self.messages is None:
            raise ValueError("tools need messages (a chat), not a prompt")
        if (self.tool_choice is not None or self.parallel_tool_calls is not None) and (
            not self.tools
        ):
            raise ValueError("tool_choice and parallel_tool_calls need tools")
        if isinstance(self.tool_choice, NamedTool):
            name = self.tool_choice.function.name
            if name not in {t.function.name for t in self.tools or []}:
                raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
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
    tool_calls: list[ToolCall] = Field(default_factory=list)


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
