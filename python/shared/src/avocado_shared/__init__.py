"""Spicy Avocado's shared contract: settings, topology, Celery config, job contracts, producer,
and the results table."""

from __future__ import annotations

from avocado_shared.celery_config import celery_config, make_celery
from avocado_shared.contracts import (
    ChatMessage,
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    GenerateResult,
    InvalidRequest,
    JobKind,
    JobResult,
    SummarizeContent,
    SummarizeOptions,
    SummarizeRequest,
    SummarizeResult,
    Usage,
    parse_result,
)
from avocado_shared.producer import (
    JobFailed,
    JobHandle,
    Producer,
    PublishError,
    PublishOutcomeUnknown,
    embed,
    generate,
    summarize,
)
from avocado_shared.settings import Settings
from avocado_shared.store import JobStatus, ResultRow, ResultStore, StoreError
from avocado_shared.topology import declare_topology

__all__ = [
    "ChatMessage",
    "EmbedRequest",
    "EmbedResult",
    "GenerateRequest",
    "GenerateResult",
    "InvalidRequest",
    "JobFailed",
    "JobHandle",
    "JobKind",
    "JobResult",
    "JobStatus",
    "Producer",
    "PublishError",
    "PublishOutcomeUnknown",
    "ResultRow",
    "ResultStore",
    "Settings",
    "StoreError",
    "SummarizeContent",
    "SummarizeOptions",
    "SummarizeRequest",
    "SummarizeResult",
    "Usage",
    "celery_config",
    "declare_topology",
    "embed",
    "generate",
    "make_celery",
    "parse_result",
    "summarize",
]
