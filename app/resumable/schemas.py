"""The JSON body that makes a model or a dataset from finished uploads (``POST /v1/models``,
``POST /v1/datasets`` with ``Content-Type: application/json``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from app.uploads import MAX_FILE_PARTS


class FromUploads(BaseModel):
    """``files``: the file name each upload becomes (``config.json``, ``model.safetensors``, ...)
    mapped to the id of a finished upload of the caller's; each upload is used once."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str | None = Field(default=None, description="As the multipart form's `name` field")
    files: dict[str, str] = Field(min_length=1, max_length=MAX_FILE_PARTS)


FROM_UPLOADS_SCHEMA = {
    "type": "object",
    "required": ["files"],
    "additionalProperties": False,
    "properties": {
        # The services' rule (NAME_RE; it also takes non-ASCII letters).
        "name": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": r"^[\w .:@+-]+$"},
        "files": {
            "type": "object",
            "minProperties": 1,
            "maxProperties": MAX_FILE_PARTS,
            "additionalProperties": {"type": "string", "description": "the id of a finished upload (/v1/uploads)"},
            "description": "file name -> upload id; the file names follow the rules of multipart uploads",
        },
    },
}
