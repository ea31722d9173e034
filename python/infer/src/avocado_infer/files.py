"""Uploaded files (OpenAI's Files API, for batches), kept in a directory: each file's bytes in
``file-<id>``, its metadata in ``file-<id>.json`` beside them.

A sidecar per file rather than a shared index: several gateways can share the directory (a
volume) with no lock and no database migration; each write is a rename, so a reader sees a
file whole or not at all. A file without its sidecar does not exist (an upload cut short,
or a delete half done), and listing reads the sidecars only, never the bytes.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from avocado_shared.errors import NotFound

__all__ = ["FileStore", "StoredFile", "UnknownFile"]


class UnknownFile(NotFound):
    """No file of this id that the caller may see (404, as OpenAI answers)."""

    def __init__(self, file_id: str) -> None:
        super().__init__(f"No such File object: {file_id}")


@dataclass(frozen=True)
class StoredFile:
    """A file's metadata; ``owner``: the name of the API key that uploaded it (None: no key)."""

    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    owner: str | None = None

    def to_json(self) -> dict[str, Any]:
        """OpenAI's File object."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }

    def visible_to(self, owner: str | None, admin: bool) -> bool:
        """Whether a caller (key ``owner``, or no key when none is asked for) may see it."""
        return owner is None or admin or self.owner == owner


def _valid_id(file_id: str) -> bool:
    return file_id.startswith("file-") and file_id[5:].isalnum()


class FileStore:
    """The files in ``root`` (made on first write)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def new_id(self) -> str:
        return f"file-{secrets.token_hex(12)}"

    def uploading(self, file_id: str) -> Path:
        """A directory (made here, on the files' file system) that an upload is written into
        as it arrives, before the file exists; the caller removes it."""
        directory = self.root / ".uploads" / file_id
        directory.mkdir(parents=True)
        return directory

    def path(self, file_id: str) -> Path:
        """The bytes of ``file_id``."""
        return self.root / file_id

    def _meta(self, file_id: str) -> Path:
        return self.root / f"{file_id}.json"

    def commit(
        self, file_id: str, written: Path, filename: str, purpose: str, owner: str | None
    ) -> StoredFile:
        """Make the upload at ``written`` the file ``file_id``: its bytes, then its sidecar."""
        stored = StoredFile(
            id=file_id,
            bytes=written.stat().st_size,
            created_at=int(time.time()),
            filename=filename,
            purpose=purpose,
            owner=owner,
        )
        os.replace(written, self.path(file_id))
        self._write_meta(stored)
        return stored

    def _write_meta(self, stored: StoredFile) -> None:
        temporary = self.root / f".{stored.id}.json.partial"
        temporary.write_text(json.dumps(asdict(stored)))
        os.replace(temporary, self._meta(stored.id))

    def get(self, file_id: str, owner: str | None = None, admin: bool = True) -> StoredFile:
        """The file ``file_id``; ``UnknownFile`` when there is none the caller may see."""
        if not _valid_id(file_id):
            raise UnknownFile(file_id)
        try:
            stored = StoredFile(**json.loads(self._meta(file_id).read_text()))
        except FileNotFoundError:
            raise UnknownFile(file_id) from None
        if not stored.visible_to(owner, admin):
            raise UnknownFile(file_id)
        return stored

    def list(self, owner: str | None = None, admin: bool = True) -> list[StoredFile]:
        """The files the caller may see, newest first."""
        found = []
        for meta in self.root.glob("file-*.json"):
            try:
                stored = StoredFile(**json.loads(meta.read_text()))
            except FileNotFoundError:  # deleted while listed
                continue
            if stored.visible_to(owner, admin):
                found.append(stored)
        return sorted(found, key=lambda f: (f.created_at, f.id), reverse=True)

    def delete(self, file_id: str, owner: str | None = None, admin: bool = True) -> None:
        """Delete ``file_id``: its sidecar first, so it is gone at once, then its bytes."""
        self.get(file_id, owner, admin)
        self._meta(file_id).unlink(missing_ok=True)
        self.path(file_id).unlink(missing_ok=True)
