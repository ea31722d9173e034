"""OpenAI's Files API on a fake gateway (``tests/fake_gateway.py``) with a real directory: the
``openai`` SDK's own upload, list, retrieve, content and delete, read back with its own models;
an upload over its limit is a 413 in OpenAI's shape and leaves nothing behind; a file belongs
to the key that uploaded it."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import anyio
import openai
import pytest
from openai.types import FileDeleted, FileObject

from avocado_shared.keys import ApiKey
from tests.fake_gateway import Served

Serve = Callable[..., Served]

LINES = b"".join(
    json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/embeddings"}).encode() + b"\n"
    for i in range(3)
)


def _sdk(app: Served, key: str = "-") -> openai.OpenAI:
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key=key, http_client=app.client, max_retries=0
    )


def _keyed(served: Serve, tmp_path: Path, **fields: object) -> Served:
    app = served(require_keys=True, files_dir=tmp_path, **fields)
    made = datetime.now()
    app.fake.keys = {
        "avk_a": ApiKey("a", rpm=0, concurrency=0, created_at=made),
        "avk_b": ApiKey("b", rpm=0, concurrency=0, created_at=made),
        "avk_admin": ApiKey("root", rpm=0, concurrency=0, created_at=made, admin=True),
    }
    return app


def test_the_sdk_uploads_lists_reads_and_deletes_a_file(served: Serve, tmp_path: Path) -> None:
    sdk = _sdk(served(files_dir=tmp_path))

    made = sdk.files.create(file=("requests.jsonl", LINES), purpose="batch")
    older = sdk.files.create(file=("empty.jsonl", b""), purpose="batch")

    assert isinstance(made, FileObject)
    assert made.id.startswith("file-")
    assert (made.bytes, made.filename, made.purpose) == (len(LINES), "requests.jsonl", "batch")
    assert sdk.files.retrieve(made.id) == made
    assert sdk.files.content(made.id).content == LINES
    assert sdk.files.content(older.id).content == b""
    assert {f.id for f in sdk.files.list()} == {made.id, older.id}
    assert [f.id for f in sdk.files.list(limit=1)] != []
    deleted = sdk.files.delete(made.id)
    assert deleted == FileDeleted(id=made.id, object="file", deleted=True)
    assert [f.id for f in sdk.files.list()] == [older.id]
    with pytest.raises(openai.NotFoundError, match=f"No such File object: {made.id}"):
        sdk.files.retrieve(made.id)
    # Nothing but the two files' bytes and sidecars, less the deleted one's: no upload left.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        older.id,
        f"{older.id}.json",
    ]


def test_the_list_pages_after_a_file(served: Serve, tmp_path: Path) -> None:
    app = served(files_dir=tmp_path)
    sdk = _sdk(app)
    ids = [sdk.files.create(file=(f"{i}.jsonl", LINES), purpose="batch").id for i in range(3)]

    first = app.client.get("/v1/files", params={"limit": 2, "order": "asc"}).json()
    rest = app.client.get(
        "/v1/files", params={"limit": 2, "order": "asc", "after": first["last_id"]}
    ).json()
    paged = sdk.files.list(limit=1, order="asc")

    listed = [f["id"] for f in first["data"] + rest["data"]]
    assert sorted(listed) == sorted(ids)
    assert (first["has_more"], rest["has_more"]) == (True, False)
    assert sorted(f.id for f in paged.iter_pages() for f in f.data) == sorted(ids)


def test_an_upload_over_the_limit_is_a_413_and_leaves_nothing(
    served: Serve, tmp_path: Path
) -> None:
    app = served(files_dir=tmp_path, max_file_bytes=4096, max_body_bytes=2048)
    sdk = _sdk(app)

    with pytest.raises(openai.APIStatusError) as refused:
        sdk.files.create(file=("big.jsonl", b"x" * 5000), purpose="batch")
    # A file over the requests' body limit but within the files' one is taken.
    taken = sdk.files.create(file=("mid.jsonl", b"y" * 3000), purpose="batch")

    assert refused.value.status_code == 413
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["message"] == (
        "the request body is over the gateway's limit of 4096 bytes "
        "(AVOCADO_INFER_MAX_FILE_BYTES): split the file"
    )
    assert error["type"] == "invalid_request_error"
    assert taken.bytes == 3000
    assert [f.id for f in sdk.files.list()] == [taken.id]


def test_an_upload_sent_in_chunks_over_the_limit_is_a_413(served: Serve, tmp_path: Path) -> None:
    app = served(files_dir=tmp_path, max_file_bytes=4096)
    boundary = "b0undary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + b"z" * 6000
        + f"\r\n--{boundary}--\r\n".encode()
    )

    answer = app.client.post(
        "/v1/files",
        content=iter([body[i : i + 1000] for i in range(0, len(body), 1000)]),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )

    assert answer.status_code == 413
    assert "AVOCADO_INFER_MAX_FILE_BYTES" in answer.json()["error"]["message"]
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize(
    ("files", "data", "message"),
    [
        ({"file": ("a.jsonl", b"{}")}, {"purpose": "fine-tune"}, "purpose: 'fine-tune'"),
        ({"file": ("a.jsonl", b"{}")}, {}, "purpose: None"),
        (None, {"purpose": "batch"}, "file: one file is required"),
        ({"other": ("a.jsonl", b"{}")}, {"purpose": "batch"}, "file: one file is required"),
    ],
)
def test_a_bad_upload_is_a_400_in_openai_shape(
    served: Serve,
    tmp_path: Path,
    files: dict[str, tuple[str, bytes]] | None,
    data: dict[str, str],
    message: str,
) -> None:
    app = served(files_dir=tmp_path)
    # A form with no file part at all is sent as multipart all the same.
    answer = app.client.post("/v1/files", files=files or {"x": (None, b"")}, data=data)

    assert answer.status_code == 400
    assert message in answer.json()["error"]["message"]
    assert answer.json()["error"]["type"] == "invalid_request_error"
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_a_json_body_is_a_400(served: Serve, tmp_path: Path) -> None:
    answer = served(files_dir=tmp_path).client.post("/v1/files", json={"purpose": "batch"})

    assert answer.status_code == 400
    assert "multipart/form-data" in answer.json()["error"]["message"]


def test_a_file_belongs_to_the_key_that_uploaded_it(served: Serve, tmp_path: Path) -> None:
    app = _keyed(served, tmp_path)
    a, b, admin = (_sdk(app, key) for key in ("avk_a", "avk_b", "avk_admin"))
    made = a.files.create(file=("a.jsonl", LINES), purpose="batch")

    assert [f.id for f in a.files.list()] == [made.id]
    assert [f.id for f in b.files.list()] == []
    assert [f.id for f in admin.files.list()] == [made.id]
    assert admin.files.content(made.id).content == LINES
    for read in (b.files.retrieve, b.files.content, b.files.delete):
        with pytest.raises(openai.NotFoundError, match=f"No such File object: {made.id}"):
            read(made.id)
    assert a.files.retrieve(made.id).id == made.id


def test_a_client_that_leaves_mid_upload_leaves_nothing(served: Serve, tmp_path: Path) -> None:
    app = served(files_dir=tmp_path)
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    messages = [
        {"type": "http.request", "body": head + b"x" * 1000, "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return messages.pop(0)

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    headers = [(b"content-type", f"multipart/form-data; boundary={boundary}".encode())]
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/files",
        "raw_path": b"/v1/files",
        "query_string": b"",
        "headers": headers,
        "http_version": "1.1",
        "scheme": "http",
        "server": ("testserver", 80),
        "client": ("testclient", 1),
        "root_path": "",
        "app": app.app,
    }
    anyio.run(app.app, scope, receive, send)  # type: ignore[arg-type]

    assert sent[0]["status"] == 499
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
