from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel


class DatasetOut(BaseModel):
    id: str
    name: str
    format: Literal["txt", "jsonl"]
    samples: int
    # True when every sample has a label; ``labels`` then lists the distinct labels, sorted.
    labeled: bool
    labels: list[int] | list[str] | None
    size_bytes: int
    sha256: str
    created_at: datetime


class DatasetPage(BaseModel):
    items: list[DatasetOut]
    next_cursor: str | None
