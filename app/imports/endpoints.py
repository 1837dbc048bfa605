"""Imports by reference: POST /v1/models/import."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/v1/models", tags=["models"])
