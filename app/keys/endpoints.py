"""API keys over the API (admin scope): list and revoke."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/v1/keys", tags=["keys"])
