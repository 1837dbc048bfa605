from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel


class ModelFile(BaseModel):
    name: str
    size_bytes: int
    sha256: str


class ModelOut(BaseModel):
    id: str
    name: str
    format: Literal["hf", "safetensors"]
    architecture: str | None
    parameters: int
    size_bytes: int
    # For a bare safetensors file: the file's sha256. For an HF directory: sha256 of the sorted
    # lines "<sha256>  <name>\n" of its files (the format of `sha256sum`).
    sha256: str
    created_at: datetime
    files: list[ModelFile]


class ModelPage(BaseModel):
    items: list[ModelOut]
    next_cursor: str | None
