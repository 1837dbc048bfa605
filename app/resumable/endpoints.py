"""Resumable uploads (tus 1.0) at /v1/uploads."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/v1/uploads", tags=["uploads"])
