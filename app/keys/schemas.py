from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Every scope a key may carry. "admin": list, create and revoke the keys of every tenant.
Scope = Literal["admin"]
SCOPES: tuple[str, ...] = ("admin",)
# A tenant name: what `modelpress keys create --tenant` and POST /v1/keys accept (a full match:
# no trailing newline, no path separators, no spaces).
TENANT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class ApiKeyOut(BaseModel):
    """An API key as the API shows it: never its secret (only ``prefix``, the part after ``mp_``)."""

    id: str
    tenant: str = Field(description="the tenant's name")
    tenant_id: str
    prefix: str = Field(description="the key is mp_<prefix>_<secret>: enough to recognise it, useless to sign in")
    scopes: list[str] = Field(description='what the key may do beyond its tenant\'s own objects: [] or ["admin"]')
    created_at: datetime
    revoked_at: datetime | None = Field(description="set once the key is revoked; a revoked key is refused (401)")


class ApiKeyPage(BaseModel):
    items: list[ApiKeyOut]
    next_cursor: str | None


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="the whole key, shown this once (only its sha256 is stored)")


class ApiKeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenant: str = Field(pattern=TENANT_NAME_PATTERN, description="the tenant's name (created if new)")
    scopes: list[Scope] = Field(default_factory=list, max_length=len(SCOPES), description='[] or ["admin"]')


class RevokeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9-]+$",
        description="the key's id, or its prefix (the part between mp_ and the next _)",
    )
