"""The request body of POST /v1/models/import (its answer is app/models/schemas.py's ModelOut)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ImportIn(BaseModel):
    """A model to import by reference: the server fetches, validates and stores it (docs/IMPORTS.md)."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        min_length=1,
        max_length=2000,
        description="`s3://bucket/prefix/` (a Hugging Face directory: the objects directly under the prefix), "
        "`s3://bucket/key.safetensors` (one object), or `https://host/path/model.safetensors` (one file)",
        examples=["s3://models/gpt2/", "https://example.com/weights/model.safetensors"],
    )
    # The service's rule (app.models.service.NAME_RE); default: the source's last path segment.
    name: str | None = Field(default=None, min_length=1, max_length=200, pattern=r"^[\w .:@+-]+$")
