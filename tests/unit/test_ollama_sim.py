"""The Ollama simulator, driven by the official `ollama` client so it cannot drift
from the real API: its pydantic models must parse every answer."""

from __future__ import annotations

import json
import selectors
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import ollama
import pytest
from pydantic import BaseModel

from avocado_sim import OllamaSimulator, Outcome, SimConfig
from tests.processes import wait_for

MODEL = "llama3.2:1b"
# Plain http only; sharing one context spares every client ~0.1 s of CA loading.
TLS = ssl.create_default_context()
BUSY = "server busy, please try again.  maximum pending requests exceeded"

SimFactory = Callable[..., OllamaSimulator]


@pytest.fixture
def make_sim() -> Iterator[SimFactory]:
    """Start simulators with SimConfig overrides; all are stopped at teardown."""
    started: list[OllamaSimulator] = []

    def factory(**overrides: Any) -> OllamaSimulator:
        sim = OllamaSimulator(SimConfig(**overrides)).start()
        started.append(sim)
        return sim

    yield factory
    for sim in started:
        sim.stop()


@pytest.fixture
def sim(make_sim: SimFactory) -> OllamaSimulator:
    return make_sim()


@pytest.fixture
def client(sim: OllamaSimulator) -> Iterator[ollama.Client]:
    with ollama.Client(host=sim.url, timeout=10, verify=TLS) as made:
        yield made


@pytest.fixture
def http(sim: OllamaSimulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.url, timeout=10, verify=TLS) as made:
        yield made


def _assert_final_metrics(reply: ollama.GenerateResponse | ollama.ChatResponse) -> None:
    assert reply.done is True
    assert reply.model == MODEL
    assert reply.created_at
    assert (reply.eval_count or 0) > 0
    assert (reply.prompt_eval_count or 0) > 0
    for duration in (
        reply.total_duration,
        reply.load_duration,
        reply.prompt_eval_duration,
        reply.eval_duration,
    ):
        assert duration is not None
        assert duration > 0


# -- plain endpoints ---------------------------------------------------------


def test_root_and_version(http: httpx.Client) -> None:
    root = http.get("/")
    head = http.head("/")
    version = http.get("/api/version")

    assert (root.status_code, root.text) == (200, "Ollama is running")
    assert head.status_code == 200
    assert head.content == b""
    assert version.status_code == 200
    assert version.json()["version"].count(".") == 2


def test_unknown_path_and_wrong_method(http: httpx.Client) -> None:
    missing = http.get("/api/nope")
    wrong = http.get("/api/generate")

    assert (missing.status_code, missing.text) == (404, "404 page not found")
    assert wrong.status_code == 405


def test_list_show_and_ps_parse(client: ollama.Client, sim: OllamaSimulator) -> None:
    listed = client.list()
    shown = client.show(MODEL)
    before = client.ps()

    client.generate(model=MODEL, prompt="warm up")
    after = client.ps()

    assert [m.model for m in listed.models] == [MODEL]
    entry = listed.models[0]
    assert (entry.size or 0) > 0
    assert len(entry.digest or "") == 64
    assert entry.details is not None
    assert entry.details.family == "llama"
    assert entry.modified_at is not None
    assert shown.modelinfo is not None
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.context_length"] == sim.config.context_length
    assert "completion" in (shown.capabilities or [])
    assert shown.template
    assert shown.modelfile
    assert shown.parameters
    assert before.models == []
    assert [m.model for m in after.models] == [MODEL]
    assert after.models[0].context_length == sim.config.context_length
    assert after.models[0].expires_at is not None
    assert after.models[0].expires_at.timestamp() > time.time()
    assert after.models[0].size_vram == entry.size


def test_show_unknown_model_is_404(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.show("nope:1b")

    assert caught.value.status_code == 404
    assert caught.value.error == "model 'nope:1b' not found"


# -- generate and chat ---------------------------------------------------------


def test_generate_non_streaming(client: ollama.Client, sim: OllamaSimulator) -> None:
    reply = client.generate(model=MODEL, prompt="Why is the sky blue?")
    again = client.generate(model=MODEL, prompt="Why is the sky blue?")
    other = client.generate(model=MODEL, prompt="Why is the grass green?")

    _assert_final_metrics(reply)
    assert reply.done_reason == "stop"
    assert reply.response
    assert len(reply.response.split()) == reply.eval_count == sim.config.default_tokens
    assert reply.prompt_eval_count == 5
    assert reply.context
    assert again.response == reply.response  # deterministic from the input
    assert other.response != reply.response
    assert sim.generation_calls == 3


def test_generate_streaming_matches_non_streaming(client: ollama.Client) -> None:
    chunks = list(client.generate(model=MODEL, prompt="Tell me a story", stream=True))
    whole = client.generate(model=MODEL, prompt="Tell me a story")

    assert all(c.done is False for c in chunks[:-1])
    assert all(c.response for c in chunks[:-1])
    final = chunks[-1]
    _assert_final_metrics(final)
    assert final.response == ""
    assert final.done_reason == "stop"
    assert final.eval_count == len(chunks) - 1
    assert "".join(c.response or "" for c in chunks) == whole.response


def test_chat_non_streaming_and_streaming(client: ollama.Client) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hello to the avocado"},
    ]
    whole = client.chat(model=MODEL, messages=messages)
    chunks = list(client.chat(model=MODEL, messages=messages, stream=True))

    _assert_final_metrics(whole)
    assert whole.message.role == "assistant"
    assert whole.message.content
    assert whole.done_reason == "stop"
    assert whole.prompt_eval_count == 8
    assert all(c.message.role == "assistant" for c in chunks)
    _assert_final_metrics(chunks[-1])
    assert "".join(c.message.content or "" for c in chunks) == whole.message.content


def test_chat_with_tools_returns_a_tool_call(client: ollama.Client) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
    reply = client.chat(
        model=MODEL, messages=[{"role": "user", "content": "Weather?"}], tools=[tool]
    )

    assert reply.message.tool_calls
    call = reply.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert isinstance(call.function.arguments["city"], str)
    assert isinstance(call.function.arguments["days"], int)


def test_num_predict_gives_exactly_that_many_tokens(client: ollama.Client) -> None:
    whole = client.generate(model=MODEL, prompt="Count", options={"num_predict": 7})
    chunks = list(
        client.generate(model=MODEL, prompt="Count", options={"num_predict": 5}, stream=True)
    )

    assert whole.done_reason == "length"
    assert whole.eval_count == 7
    assert len((whole.response or "").split()) == 7
    assert len([c for c in chunks if c.response]) == 5
    assert chunks[-1].done_reason == "length"


def test_prompt_eval_count_is_capped_by_num_ctx(client: ollama.Client) -> None:
    prompt = "word " * 100
    full = client.generate(model=MODEL, prompt=prompt, system="be brief")
    capped = client.generate(model=MODEL, prompt=prompt, options={"num_ctx": 64})

    assert full.prompt_eval_count == 102
    assert capped.prompt_eval_count == 64


def test_format_json_is_valid_json(client: ollama.Client) -> None:
    reply = client.generate(model=MODEL, prompt="Describe the sky", format="json")

    assert isinstance(json.loads(reply.response or ""), dict)


class _Address(BaseModel):
    street: str
    zip_code: int


class _Person(BaseModel):
    name: str
    age: int
    height_m: float
    admin: bool
    tags: list[str]
    role: Literal["owner", "guest"]
    address: _Address
    nickname: str | None = None


@pytest.mark.parametrize("stream", [False, True])
def test_format_schema_fills_the_required_properties(client: ollama.Client, stream: bool) -> None:
    schema = _Person.model_json_schema()

    if stream:
        parts = client.generate(model=MODEL, prompt="Who?", format=schema, stream=True)
        text = "".join(p.response or "" for p in parts)
    else:
        text = client.generate(model=MODEL, prompt="Who?", format=schema).response or ""

    data = json.loads(text)
    assert set(schema["required"]) <= set(data)
    person = _Person.model_validate(data)
    assert person.role == "owner"
    assert isinstance(person.address.zip_code, int)


def test_options_system_and_messages_are_recorded(
    client: ollama.Client, sim: OllamaSimulator
) -> None:
    options = {"temperature": 0.2, "num_ctx": 2048, "seed": 7}
    client.generate(
        model=MODEL,
        prompt="Hi",
        system="Be kind",
        options=options,
        format="json",
        keep_alive="10m",
    )
    client.chat(model=MODEL, messages=[{"role": "user", "content": "Yo"}], keep_alive=0)

    generate = sim.requests.last("/api/generate")
    chat = sim.requests.last("/api/chat")
    assert generate.method == "POST"
    assert generate.body["options"] == options
    assert generate.body["system"] == "Be kind"
    assert generate.body["format"] == "json"
    assert generate.body["keep_alive"] == "10m"
    assert chat.body["messages"] == [{"role": "user", "content": "Yo"}]
    assert chat.body["keep_alive"] == 0
    assert [r.path for r in sim.requests] == ["/api/generate", "/api/chat"]

    sim.clear()

    assert len(sim.requests) == 0
    assert sim.generation_calls == 0


def test_empty_prompt_loads_and_keep_alive_zero_unloads(client: ollama.Client) -> None:
    loaded = client.generate(model=MODEL, prompt="")
    resident = client.ps()
    unloaded = client.generate(model=MODEL, prompt="", keep_alive=0)

    assert (loaded.done, loaded.done_reason, loaded.response) == (True, "load", "")
    assert [m.model for m in resident.models] == [MODEL]
    assert unloaded.done_reason == "unload"
    assert client.ps().models == []


# -- pull ------------------------------------------------------------------------


def test_pull_streams_progress_then_the_model_is_listed(make_sim: SimFactory) -> None:
    sim = make_sim(hub=["qwen2.5:0.5b"], pull_chunks=3)
    with ollama.Client(host=sim.url, timeout=10, verify=TLS) as client:
        progress = list(client.pull("qwen2.5:0.5b", stream=True))
        names = [m.model for m in client.list().models]
        reply = client.generate(model="qwen2.5:0.5b", prompt="hello")

    statuses = [p.status for p in progress]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    layers = [p for p in progress if p.digest]
    assert layers
    assert len(layers) % 3 == 0
    for p in layers:
        assert (p.digest or "").startswith("sha256:")
        assert p.status == f"pulling {(p.digest or '')[7:19]}"
        assert 0 < (p.completed or 0) <= (p.total or 0)
    assert layers[-1].completed == layers[-1].total
    assert "qwen2.5:0.5b" in names
    assert reply.done is True


def test_pull_non_streaming_returns_success(make_sim: SimFactory) -> None:
    sim = make_sim()
    with ollama.Client(host=sim.url, timeout=10, verify=TLS) as client:
        reply = client.pull("mistral")

    assert reply.status == "success"
    assert "mistral:latest" in sim.config.models


def test_pull_of_a_model_missing_from_the_hub(make_sim: SimFactory) -> None:
    sim = make_sim(hub=["llama3.2:1b"])
    with ollama.Client(host=sim.url, timeout=10, verify=TLS) as client:
        with pytest.raises(ollama.ResponseError, match="file does not exist") as streamed:
            list(client.pull("no-such-model:7b", stream=True))
        with pytest.raises(ollama.ResponseError) as waited:
            client.pull("no-such-model:7b")

    # Streamed: HTTP 200, then an {"error": ...} line; waited: a 500, as Ollama does.
    assert streamed.value.status_code == -1
    assert waited.value.status_code == 500
    assert waited.value.error == "pull model manifest: file does not exist"
    assert "no-such-model:7b" not in sim.config.models


# -- errors ------------------------------------------------------------------------


def _generate(client: ollama.Client, model: str) -> object:
    return client.generate(model=model, prompt="hi")


def _generate_streamed(client: ollama.Client, model: str) -> object:
    return list(client.generate(model=model, prompt="hi", stream=True))


def _chat(client: ollama.Client, model: str) -> object:
    return client.chat(model=model, messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("call", [_generate, _generate_streamed, _chat])
def test_unknown_model_is_404(
    client: ollama.Client, call: Callable[[ollama.Client, str], object]
) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        call(client, "nope:1b")

    assert caught.value.status_code == 404
    assert caught.value.error == "model 'nope:1b' not found"


def test_fail_first_counts_down(client: ollama.Client, sim: OllamaSimulator) -> None:
    sim.config.fail_first = 2

    errors = []
    for _ in range(2):
        with pytest.raises(ollama.ResponseError) as caught:
            client.generate(model=MODEL, prompt="hi")
        errors.append(caught.value)
    reply = client.generate(model=MODEL, prompt="hi")

    assert [(e.status_code, e.error) for e in errors] == [(503, BUSY), (503, BUSY)]
    assert reply.done is True
    assert sim.config.fail_first == 0
    assert sim.generation_calls == 3


@pytest.mark.parametrize("status", [500, 400, 503])
def test_fail_status_is_ollama_shaped_json(
    http: httpx.Client, sim: OllamaSimulator, status: int
) -> None:
    sim.config.fail_first, sim.config.fail_status = 1, status

    failed = http.post("/api/chat", json={"model": MODEL, "messages": []})
    ok = http.post("/api/chat", json={"model": MODEL, "messages": [], "stream": False})

    assert failed.status_code == status
    assert failed.headers["content-type"].startswith("application/json")
    assert isinstance(failed.json()["error"], str)
    assert failed.json()["error"]
    assert ok.status_code == 200


@pytest.mark.parametrize("status", [502, 504])
def test_gateway_failures_are_plain_text(
    client: ollama.Client, sim: OllamaSimulator, status: int
) -> None:
    sim.config.fail_first, sim.config.fail_status = 1, status

    with pytest.raises(ollama.ResponseError) as streamed:
        list(client.generate(model=MODEL, prompt="hi", stream=True))
    sim.config.fail_first = 1
    with pytest.raises(ollama.ResponseError) as waited:
        client.generate(model=MODEL, prompt="hi")

    for caught in (streamed, waited):
        assert caught.value.status_code == status
        assert caught.value.error.startswith(f"{status} ")  # no JSON body to unwrap


def test_bad_requests_are_400(client: ollama.Client, http: httpx.Client) -> None:
    with pytest.raises(ollama.ResponseError) as thinking:
        client.generate(model=MODEL, prompt="hi", think=True)
    garbage = http.post("/api/generate", content=b"{not json")
    empty = http.post("/api/chat", content=b"")
    no_model = http.post("/api/chat", json={"messages": []})
    wrong_type = http.post("/api/generate", json={"model": MODEL, "stream": "yes"})
    # Ollama's GenerateHandler answers a missing model with a 404, not a 400.
    no_model_generate = http.post("/api/generate", json={"prompt": "hi"})

    assert thinking.value.status_code == 400
    assert thinking.value.error == f'"{MODEL}" does not support thinking'
    assert garbage.status_code == 400
    assert garbage.json()["error"].startswith("invalid character")
    assert (empty.status_code, empty.json()) == (400, {"error": "missing request body"})
    assert (no_model.status_code, no_model.json()) == (400, {"error": "model is required"})
    assert wrong_type.status_code == 400
    assert "GenerateRequest.stream of type bool" in wrong_type.json()["error"]
    assert no_model_generate.status_code == 404
    assert no_model_generate.json() == {"error": "model '' not found"}


def test_foreign_host_header_is_forbidden(sim: OllamaSimulator, http: httpx.Client) -> None:
    tunnel = http.get("/api/tags", headers={"Host": "abc123.ngrok-free.app"})
    local = http.get("/api/tags", headers={"Host": "localhost:11434"})
    ipv6 = http.get("/api/tags", headers={"Host": "[::1]:11434"})

    sim.config.allowed_hosts = ["*"]
    opened = http.get("/api/tags", headers={"Host": "abc123.ngrok-free.app"})

    assert (tunnel.status_code, tunnel.content) == (403, b"")
    assert local.status_code == 200
    assert ipv6.status_code == 200
    assert opened.status_code == 200


# -- scheduling and timing -----------------------------------------------------------


def test_requests_beyond_parallel_and_queue_get_503(make_sim: SimFactory) -> None:
    sim = make_sim(latency_ms=300, parallel=1, max_queue=0)
    body = {"model": MODEL, "prompt": "hi", "stream": False}
    first: list[httpx.Response] = []

    with (
        httpx.Client(base_url=sim.url, timeout=10, verify=TLS) as a,
        httpx.Client(base_url=sim.url, timeout=10, verify=TLS) as b,
    ):
        slow = threading.Thread(target=lambda: first.append(a.post("/api/generate", json=body)))
        slow.start()
        assert sim.wait_in_flight(1, timeout=5)
        second = b.post("/api/generate", json=body)
        first_done_by_then = bool(first)
        slow.join(timeout=10)

    assert (second.status_code, second.json()) == (503, {"error": BUSY})
    assert not first_done_by_then, "refused at once, not after waiting for the slot"
    assert first[0].status_code == 200
    assert sim.wait_in_flight(0, timeout=5)  # its handler leaves the slot after it answers


def test_queued_requests_wait_for_a_slot(make_sim: SimFactory) -> None:
    sim = make_sim(latency_ms=100, parallel=1, max_queue=1)
    body = {"model": MODEL, "prompt": "hi", "stream": False}
    statuses: list[int] = []

    def call() -> None:
        with httpx.Client(base_url=sim.url, timeout=10, verify=TLS) as c:
            statuses.append(c.post("/api/generate", json=body).status_code)

    started = time.perf_counter()
    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)

    assert statuses == [200, 200]
    assert time.perf_counter() - started >= 0.2  # one after the other


def test_latency_and_token_pacing(make_sim: SimFactory) -> None:
    sim = make_sim(latency_ms=50, tokens_per_s=200)
    with ollama.Client(host=sim.url, timeout=10, verify=TLS) as client:
        started = time.perf_counter()
        stream = client.generate(model=MODEL, prompt="hi", options={"num_predict": 10}, stream=True)
        first = next(iter(stream))
        first_at = time.perf_counter() - started
        rest = list(stream)
        streamed_in = time.perf_counter() - started

        started = time.perf_counter()
        whole = client.generate(model=MODEL, prompt="hi", options={"num_predict": 10})
        waited = time.perf_counter() - started

    assert first.response
    assert first_at >= 0.05
    assert streamed_in >= 0.05 + 10 / 200
    assert (rest[-1].eval_duration or 0) >= 0.9 * 10 / 200 * 1e9
    assert waited >= 0.05 + 10 / 200
    assert whole.eval_count == 10


def test_latency_jitter_varies_each_generation(make_sim: SimFactory) -> None:
    sim = make_sim(latency_ms=40, latency_jitter_ms=30)
    with ollama.Client(host=sim.url, timeout=10, verify=TLS) as client:
        waits = [
            (client.generate(model=MODEL, prompt="hi").prompt_eval_duration or 0) / 1e6
            for _ in range(10)
        ]

    assert min(waits) >= 10
    assert max(waits) - min(waits) > 10, f"every generation waited alike: {waits}"
    with pytest.raises(ValueError, match="latency_jitter_ms"):
        SimConfig(latency_ms=10, latency_jitter_ms=20)


def test_stop_cuts_a_running_stream(make_sim: SimFactory) -> None:
    sim = make_sim(tokens_per_s=20)
    with ollama.Client(host=sim.url, timeout=10, verify=TLS) as client:
        stream = client.generate(model=MODEL, prompt="hi", stream=True)
        assert next(iter(stream)).response
        sim.stop()
        with pytest.raises(httpx.HTTPError):
            list(stream)


# -- command line ----------------------------------------------------------------------


def _command() -> list[str]:
    script = Path(sys.executable).with_name("avocado-ollama-sim")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "avocado_sim.simulator"]


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise TimeoutError("the simulator printed nothing")
    return proc.stdout.readline().strip()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cli_serves_until_signalled(signum: signal.Signals) -> None:
    proc = subprocess.Popen(
        [*_command(), "--port", "0", "--models", "a:1b"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = _read_line(proc, timeout=20)
        prefix = "avocado-ollama-sim listening on "
        assert line.startswith(prefix), line
        url = line.removeprefix(prefix)
        tags = httpx.get(f"{url}/api/tags", timeout=5, verify=TLS).json()

        proc.send_signal(signum)
        code = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert url.startswith("http://127.0.0.1:")
    assert [m["name"] for m in tags["models"]] == ["a:1b"]
    assert code == 0
    assert proc.stdout is not None
    assert proc.stdout.read() == ""  # exactly one line


def _post_raw(sim: OllamaSimulator, prompt: str) -> socket.socket:
    """A generation sent on a bare socket, its answer left unread."""
    body = json.dumps({"model": MODEL, "prompt": prompt, "stream": False}).encode()
    head = f"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n\r\n"
    made = socket.create_connection(("127.0.0.1", sim.port))
    made.sendall(head.encode() + body)
    return made


def test_each_generation_call_is_answered_refused_or_cut(
    client: ollama.Client, sim: OllamaSimulator
) -> None:
    sim.config.fail_first = 1
    with pytest.raises(ollama.ResponseError):
        client.generate(model=MODEL, prompt="refused")
    sim.hold()
    gone = _post_raw(sim, "cut")
    kept = _post_raw(sim, "answered")
    wait_for(lambda: sim.held == 2, timeout=10, what="two answers held")
    still_held = sim.outcomes.total()

    gone.close()
    sim.release()
    kept.settimeout(10)
    answer = kept.recv(65536)
    kept.close()
    outcomes = wait_for(lambda: sim.outcomes.total() == 3 and sim.outcomes, what="three ends")

    assert still_held == 1  # only the refused call had ended
    assert answer.startswith(b"HTTP/1.1 200")
    assert outcomes == {Outcome.REFUSED: 1, Outcome.CUT: 1, Outcome.ANSWERED: 1}
    by_prompt = {r.body["prompt"]: r.outcome for r in sim.requests.to("/api/generate")}
    assert by_prompt == {
        "refused": Outcome.REFUSED,
        "cut": Outcome.CUT,
        "answered": Outcome.ANSWERED,
    }
    assert sim.abandoned == 1
    assert httpx.get(f"{sim.url}/_sim/stats").json()["outcomes"] == {
        "answered": 1,
        "refused": 1,
        "cut": 1,
    }
