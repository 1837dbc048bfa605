from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel


class ModelFile(BaseModel):
    name: str
    size_bytes: int
    sha256: str


class ImportProgress(BaseModel):
    """How far an import (POST /v1/models/import) has got: bytes and files fetched so far. The
    totals are null until known (an https source without Content-Length has no ``bytes_total``)."""

    bytes_done: int = 0
    bytes_total: int | None = None
    files_done: int = 0
    files_total: int | None = None


class ModelOut(BaseModel):
    id: str
    name: str
    # An imported model's format, architecture, parameters, size, digest and files are
    # placeholders (format from the source's shape, zeros, "" and []) until its status is "ready".
    format: Literal["hf", "safetensors"]
    architecture: str | None
    parameters: int
    size_bytes: int
    # For a bare safetensors file: the file's sha256. For an HF directory: sha256 of the sorted
    # lines "<sha256>  <name>\n" of its files (the format of `sha256sum`).
    sha256: str
    created_at: datetime
    files: list[ModelFile]
    # "ready": usable by jobs (every upload); "importing": the server is fetching it (jobs on it are
    # 409 model_not_ready); "failed": ``error`` is the problem an upload of the same bytes got.
    status: Literal["importing", "ready", "failed"] = "ready"
    # Where an import fetched from (s3://bucket/prefix/, https://host/file.safetensors); null for uploads.
    source: str | None = None
    progress: ImportProgress | None = None
    # An RFC 9457 problem body ({type, title, status, detail, code, errors?}) for a failed import.
    error: dict[str, Any] | None = None


class ModelPage(BaseModel):
    items: list[ModelOut]
    next_cursor: str | None
