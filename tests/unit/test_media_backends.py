"""Images and structured output as each backend takes them, and what a server's refusal
tells a client: Ollama's native API and the OpenAI-compatible one, against the simulator
(which says how many images it saw); the server's own errors cut to one line."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest

from avocado_sim import OllamaSimulator, SimConfig
from ollama_worker.inference import says_invalid, short_reason
from ollama_worker.ollama import OllamaClient
from ollama_worker.openai_backend import OpenAIClient, OpenAIRejected

MODEL = "llama3.2:1b"
CHAT = "/v1/chat/completions"
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(16)).decode()
JPEG = base64.b64encode(b"\xff\xd8\xff\xe0" + bytes(16)).decode()
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "rank": {"type": "integer"}},
    "required": ["city", "rank"],
}
# llama-cpp-python 0.3.36's server's answer to a json_schema response_format (a 500).
LLAMA_CPP_PYTHON_500 = (
    "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', 'response_format', "
    "'type'), 'msg': \"Input should be 'text' or 'json_object'\", 'input': 'json_schema', "
    "'ctx': {'expected': \"'text' or 'json_object'\"}}\n\n  File "
    '"/srv/venv/lib/python3.11/site-packages/llama_cpp/server/app.py", line 376, in '
    "create_chat_completion\n    POST /v1/chat/completions"
)


@pytest.fixture
def sim() -> Iterator[OllamaSimulator]:
    with OllamaSimulator(SimConfig(models=[MODEL])) as server:
        yield server


def test_ollama_takes_images_beside_the_text_of_a_chat_and_a_prompt(sim: OllamaSimulator) -> None:
    with OllamaClient(sim.url, read_timeout=5) as client:
        chat = client.chat(MODEL, [{"role": "user", "content": "What?", "images": [PNG, JPEG]}])
        prompt = client.generate(MODEL, "What?", images=[PNG])
        continued = client.generate(MODEL, "What?", images=[PNG], partial="I see")

    assert sim.requests.last("/api/generate").body["images"] == [PNG]
    assert sim.requests.last("/api/chat").body["messages"][0]["images"] == [PNG]
    assert chat.text.startswith("I see 2 images. ")
    assert prompt.text.startswith("I see 1 image. ")
    assert continued.text.startswith("I see 1 image. ")


def test_openai_servers_get_images_as_data_url_parts(sim: OllamaSimulator) -> None:
    with OpenAIClient(f"{sim.url}/v1", read_timeout=5) as client:
        done = client.chat(
            MODEL,
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What?", "images": [PNG, JPEG]},
            ],
        )
        prompt = client.generate(MODEL, "What?", images=[PNG])

    assert done.text.startswith("I see 2 images. ")
    assert prompt.text.startswith("I see 1 image. ")
    # The prompt's request, the last: its user message's text, then its image.
    assert sim.requests.last(CHAT).body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
            ],
        }
    ]


def test_the_media_type_of_a_data_url_is_the_images_own(sim: OllamaSimulator) -> None:
    with OpenAIClient(f"{sim.url}/v1", read_timeout=5) as client:
        client.chat(MODEL, [{"role": "user", "content": "", "images": [JPEG]}])

    (part,) = sim.requests.last(CHAT).body["messages"][0]["content"]
    assert part == {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{JPEG}"}}


@pytest.mark.parametrize(
    ("server", "form"),
    [
        ("standard", {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}),
        ("llama-cpp-python", {"type": "json_object", "schema": SCHEMA}),
    ],
)
def test_a_json_schema_goes_in_the_form_its_server_takes(
    sim: OllamaSimulator, server: str, form: dict[str, object]
) -> None:
    with OpenAIClient(f"{sim.url}/v1", read_timeout=5, server=server) as client:  # type: ignore[arg-type]
        done = client.generate(MODEL, "A city", format=SCHEMA)

    assert sim.requests.last(CHAT).body["response_format"] == form
    answer = json.loads(done.text)
    assert isinstance(answer["city"], str)
    assert isinstance(answer["rank"], int)


def test_a_500_from_llama_cpp_python_is_the_requests_fault(sim: OllamaSimulator) -> None:
    """That server answers 500 to any request it cannot handle: failing at once, not after
    retries; a standard server's 500 stays worth retrying (``test_openai_api``)."""
    sim.config.fail_status = 500
    sim.config.fail_first = 1
    with (
        OpenAIClient(f"{sim.url}/v1", read_timeout=5, server="llama-cpp-python") as client,
        pytest.raises(OpenAIRejected, match=r"^openai-compatible server refused the request: "),
    ):
        client.chat(MODEL, [{"role": "user", "content": "hi"}])


def test_a_servers_validation_error_is_cut_to_where_and_what() -> None:
    assert says_invalid(LLAMA_CPP_PYTHON_500)
    assert short_reason(LLAMA_CPP_PYTHON_500) == (
        "response_format.type: Input should be 'text' or 'json_object'"
    )


@pytest.mark.parametrize(
    ("said", "told"),
    [
        ('File "/srv/app/x.py", line 3\nTypeError: bad', 'File "<path>", line 3'),
        ("model 'registry.ollama.ai/library/x:1b' not found", None),
        ("", "no reason given"),
        ("a" * 400, "a" * 299 + "…"),
    ],
)
def test_a_servers_error_reaches_a_client_as_one_line_without_paths(
    said: str, told: str | None
) -> None:
    assert not says_invalid(said)
    assert short_reason(said) == (said if told is None else told)
