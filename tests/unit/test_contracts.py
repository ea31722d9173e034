"""Contracts and settings: what is accepted, what is refused, and how the refusal reads."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from avocado_shared import (
    GenerateRequest,
    GenerateResult,
    InvalidRequest,
    JobKind,
    Settings,
    SummarizeRequest,
    SummarizeResult,
    parse_result,
)
from avocado_shared.celery_config import celery_config
from avocado_shared.contracts import validate_request
from avocado_shared.discovery import Announcement, EndpointEvent


def test_generate_request_takes_a_prompt_or_messages() -> None:
    prompt = GenerateRequest(prompt="hi")
    chat = GenerateRequest.model_validate({"messages": [{"role": "user", "content": "hi"}]})

    assert not prompt.is_chat
    assert chat.is_chat


def test_invalid_request_names_every_bad_field() -> None:
    data = {"share_id": "has space", "content": {"text": ""}, "options": {"max_words": 1}}

    with pytest.raises(InvalidRequest) as caught:
        validate_request(SummarizeRequest, data)

    text = str(caught.value)
    assert text.startswith("invalid summarize request: ")
    for field in ("share_id", "content.text", "options.max_words"):
        assert field in text


def test_unknown_fields_are_refused_not_dropped() -> None:
    with pytest.raises(InvalidRequest, match="promt"):
        validate_request(GenerateRequest, {"promt": "typo"})


def test_schema_format_needs_a_type() -> None:
    with pytest.raises(ValidationError, match="JSON schema"):
        GenerateRequest(prompt="x", format={"properties": {}})


def test_results_round_trip_through_json_by_kind() -> None:
    gen = GenerateResult(
        job_id="j1", text="t", model="m", worker="w", completion_tokens=10, eval_duration_ms=500.0
    )
    summ = SummarizeResult(job_id="j2", share_id="s", summary="x", model="m", worker="w")

    back_gen = parse_result(gen.model_dump(mode="json"))
    back_summ = parse_result(summ.model_dump(mode="json"))

    assert back_gen == gen
    assert back_summ == summ
    assert back_summ.kind is JobKind.SUMMARIZE
    assert gen.tokens_per_s == pytest.approx(20.0)


def test_time_limits_must_stay_below_the_consumer_timeout() -> None:
    with pytest.raises(ValidationError, match="consumer_timeout"):
        Settings(consumer_timeout_s=600, generate_time_limit_s=700, generate_soft_time_limit_s=60)
    with pytest.raises(ValidationError, match="soft time limit"):
        Settings(generate_soft_time_limit_s=700, generate_time_limit_s=660)


def test_settings_read_the_environment_and_hide_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVOCADO_BROKER_URL", "amqp://user:s3cret-pw@rabbit:5672/prod")
    monkeypatch.setenv("AVOCADO_DEFAULT_MODEL", "qwen2.5:0.5b")

    settings = Settings()

    assert settings.default_model == "qwen2.5:0.5b"
    assert "s3cret-pw" not in repr(settings)
    assert settings.broker_url.get_secret_value().endswith("/prod")


def test_celery_config_is_safe_for_long_llm_jobs() -> None:
    config = celery_config(Settings())

    assert config["task_acks_late"] is True
    assert config["task_reject_on_worker_lost"] is True
    assert config["worker_prefetch_multiplier"] == 1
    assert config["accept_content"] == ["json"]
    assert config["broker_transport_options"]["confirm_publish"] is True
    limits = config["task_annotations"]
    assert all(v["time_limit"] < 1800 for v in limits.values())
    queues = {q.name: q.queue_arguments for q in config["task_queues"]}
    assert queues["ml.generate"]["x-queue-type"] == "quorum"
    assert config["task_default_exchange_type"] == "topic"


def test_an_announcement_from_before_backends_is_ollama_and_a_new_one_round_trips() -> None:
    old = '{"service_id": "n1", "url": "https://n1.example", "event": "changed"}'

    assert Announcement.model_validate_json(old).backend == "ollama"
    new = Announcement(service_id="n2", url="https://n2.example", backend="openai", event="changed")
    back = Announcement.model_validate_json(new.model_dump_json())
    assert (back.backend, back.event) == ("openai", EndpointEvent.CHANGED)
    with pytest.raises(ValidationError, match="backend"):
        Announcement.model_validate_json(old.replace("}", ', "backend": "tgi"}'))
