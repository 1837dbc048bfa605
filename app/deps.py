"""Named dependency aliases so endpoints read like prose."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query

from core.config import Settings, get_settings
from core.db import UnitOfWork, get_uow
from core.pagination import query_int
from core.storage import Storage, get_storage

SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]
# scope="function": exit code runs right after the endpoint, before the response is sent, so a
# failed commit becomes an error response instead of a lost write behind a 2xx.
UoW = Annotated[UnitOfWork, Depends(get_uow, scope="function")]
# The page size of every list route.
PageLimit = Annotated[query_int(1, 200), Query()]
