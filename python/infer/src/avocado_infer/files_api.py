"""OpenAI's Files API: ``POST /v1/files`` (multipart, as the ``openai`` SDK uploads),
``GET /v1/files``, ``GET /v1/files/{id}``, ``GET /v1/files/{id}/content`` and ``DELETE
/v1/files/{id}``, for batches' input and output (``files``). An upload is written to disk as it
arrives, never held whole; its body has a limit of its own (AVOCADO_INFER_MAX_FILE_BYTES). A
file belongs to the key that uploaded it: another key gets the 404 of an unknown file, an
admin key sees every file."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from python_multipart.exceptions import FormParserError, MultipartParseError
from python_multipart.multipart import Field, File, FormParser, parse_options_header
from starlette.requests import ClientDisconnect

from avocado_infer.answer import CLIENT_CLOSED_REQUEST
from avocado_infer.deps import CallerDep, GatewayDep
from avocado_infer.errors import documented_errors, error_route
from avocado_infer.files import FileStore, StoredFile
from avocado_infer.gateway import Gateway
from avocado_infer.openai_api import OpenAIError, openai_error
from avocado_shared.contracts import InvalidRequest
from avocado_shared.keys import ApiKey

__all__ = ["Caller", "caller_of", "file_store", "listed", "router"]

router = APIRouter(
    prefix="/v1", route_class=error_route(openai_error), responses=documented_errors(OpenAIError)
)

PURPOSES = ("batch",)  # what the fleet reads files for

Caller = tuple[str | None, bool]
"""Who asks: the key's name (None: no key asked for) and whether it sees everything."""


def caller_of(key: ApiKey | None) -> Caller:
    return (None, True) if key is None else (key.name, key.admin)


def listed(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """OpenAI's page of a list: its objects, the first's and last's ids, whether more follow."""
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def file_store(gateway: Gateway) -> FileStore:
    return FileStore(gateway.settings.files_path())


class _Upload:
    """A multipart body parsed as it arrives: its file part written straight to disk in
    ``directory``, its other parts (``purpose``) kept as text."""

    def __init__(self, directory: Path, content_type: str) -> None:
        kind, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise InvalidRequest("a file is uploaded as multipart/form-data, with file and purpose")
        self.fields: dict[str, str] = {}
        self.files: list[File] = []
        config = {
            "UPLOAD_DIR": str(directory),
            "UPLOAD_DELETE_TMP": False,
            "MAX_MEMORY_FILE_SIZE": 0,
        }
        self._parser = FormParser(
            "multipart/form-data", self._field, self.files.append, boundary=boundary, config=config
        )

    def _field(self, field: Field) -> None:
        self.fields[(field.field_name or b"").decode()] = (field.value or b"").decode()

    def write(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except (FormParserError, MultipartParseError) as error:
            raise InvalidRequest(f"the multipart body cannot be read: {error}") from None

    def finish(self) -> tuple[Path, str, str]:
        """The file's path on disk, its name and its purpose; ``InvalidRequest`` unless the
        body held one file and a purpose the fleet reads."""
        self._parser.finalize()
        purpose = self.fields.get("purpose")
        if purpose not in PURPOSES:
            raise InvalidRequest(
                f"purpose: {purpose!r} is not supported here: files are for {', '.join(PURPOSES)}"
            )
        if len(self.files) != 1 or self.files[0].field_name != b"file":
            raise InvalidRequest("file: one file is required, in the form field 'file'")
        upload = self.files[0]
        if upload.in_memory:  # an empty file: nothing was written yet
            upload.flush_to_disk()
        upload.close()
        written = Path((upload.actual_file_name or b"").decode())
        return written, (upload.file_name or b"upload").decode(), purpose


@router.post("/files", response_model=None)
async def upload(
    request: Request, gateway: GatewayDep, key: CallerDep
) -> dict[str, Any] | Response:
    """Store the ``file`` of a multipart body, for ``purpose`` ``batch``: OpenAI's File
    object. A client that leaves mid-upload leaves nothing behind."""
    store = file_store(gateway)
    file_id = store.new_id()
    directory = await run_in_threadpool(store.uploading, file_id)
    try:
        body = _Upload(directory, request.headers.get("content-type", ""))
        async for chunk in request.stream():
            await run_in_threadpool(body.write, chunk)
        written, filename, purpose = await run_in_threadpool(body.finish)
        owner = None if key is None else key.name
        stored = await run_in_threadpool(store.commit, file_id, written, filename, purpose, owner)
    except ClientDisconnect:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    finally:
        await run_in_threadpool(shutil.rmtree, directory, True)
    return stored.to_json()


@router.get("/files")
async def files(
    gateway: GatewayDep,
    key: CallerDep,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
) -> dict[str, Any]:
    """The key's files, newest first unless ``order`` is asc, ``limit`` a page after the file
    ``after``: OpenAI's list."""
    found: list[StoredFile] = await run_in_threadpool(file_store(gateway).list, *caller_of(key))
    if order == "asc":
        found.reverse()
    if purpose is not None:
        found = [f for f in found if f.purpose == purpose]
    ids = [f.id for f in found]
    start = ids.index(after) + 1 if after in ids else 0
    page = [f.to_json() for f in found[start : start + limit]]
    return listed(page, has_more=start + limit < len(found))


@router.get("/files/{file_id}")
async def file(file_id: str, gateway: GatewayDep, key: CallerDep) -> dict[str, Any]:
    """OpenAI's File object; 404 when the key has no such file."""
    stored = await run_in_threadpool(file_store(gateway).get, file_id, *caller_of(key))
    return stored.to_json()


@router.get("/files/{file_id}/content", response_class=FileResponse)
async def content(file_id: str, gateway: GatewayDep, key: CallerDep) -> FileResponse:
    """The file's bytes, streamed from disk."""
    store = file_store(gateway)
    stored = await run_in_threadpool(store.get, file_id, *caller_of(key))
    return FileResponse(store.path(stored.id), media_type="application/octet-stream")


@router.delete("/files/{file_id}")
async def delete(file_id: str, gateway: GatewayDep, key: CallerDep) -> dict[str, Any]:
    """Delete the file; 404 when the key has no such file."""
    await run_in_threadpool(file_store(gateway).delete, file_id, *caller_of(key))
    return {"id": file_id, "object": "file", "deleted": True}
