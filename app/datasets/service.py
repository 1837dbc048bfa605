"""Dataset uploads: one ``.txt`` or ``.jsonl`` file, validated line by line and counted before it is
stored; nothing is kept of a refused upload."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from app import quotas
from app.auth import Caller
from app.datasets import repository
from app.uploads import StagedFile
from core.datasets.parsing import DatasetInvalid, dataset_format, iter_numbered
from core.db import UnitOfWork
from core.errors import Conflict, NotFound, Unprocessable
from core.jsonsafe import safe_text
from core.storage import Storage
from core.tables import Dataset, new_id

# Used with fullmatch only ("$" matches before a trailing newline).
NAME_RE = re.compile(r"[\w .:@+-]{1,200}")
# Labels are classes: a column of (near-)unique values is a mistake, and the row keeps them all.
MAX_LABELS = 10_000


def _reject(
    code: str,
    detail: str,
    loc: list[str | int] | None = None,
    line: int | None = None,
    file: str | None = None,
    field: str | None = None,
    kind: str | None = None,
) -> Unprocessable:
    err: dict[str, Any] = {"loc": loc or ["body", "file"], "msg": detail, "type": kind or code}
    if line is not None:
        err["line"] = line
    if file is not None:
        err["file"] = file
    if field is not None:
        err["field"] = field
    return Unprocessable(detail, code=code, errors=[err])


def inspect(path: Path, fmt: str) -> dict[str, Any]:
    """Count the samples and collect the labels; raise DatasetInvalid naming the first bad line."""
    samples = labeled = 0
    label_type: type | None = None
    distinct: set[int | str] = set()
    for line, sample in iter_numbered(path, fmt):
        samples += 1
        if "label" not in sample:
            continue
        label = sample["label"]
        if label_type is None:
            label_type = type(label)
        elif type(label) is not label_type:
            # 1 and "1" would be two classes that look alike; a method mapping labels to ids
            # needs one kind.
            raise DatasetInvalid(
                line,
                f"labels must be all integers or all strings; this one is {type(label).__name__}, "
                f"earlier ones {label_type.__name__}",
            )
        labeled += 1
        distinct.add(label)
        if len(distinct) > MAX_LABELS:
            raise DatasetInvalid(line, f"more than {MAX_LABELS} distinct labels; labels are classes")
    if samples == 0:
        raise DatasetInvalid(None, "the file has no samples (blank lines are skipped)")
    all_labeled = labeled == samples
    return {"samples": samples, "labeled": all_labeled, "labels": sorted(distinct) if all_labeled else None}


def validate_upload(files: list[StagedFile]) -> tuple[StagedFile, str, dict[str, Any]]:
    if len(files) != 1 or files[0].field != "file":
        fields = sorted({f.field for f in files})
        got = safe_text(repr(fields), 200) if fields else "none"
        raise _reject(
            "no_file" if not files else "unexpected_part", f"send exactly one multipart part named 'file' (got {got})"
        )
    f = files[0]
    try:
        fmt = dataset_format(f.filename)
    except DatasetInvalid as e:
        raise _reject("unsupported_file_type", f"{safe_text(f.filename, 200) or 'the file'}: {e.reason}") from None
    try:
        facts = inspect(f.path, fmt)
    except DatasetInvalid as e:
        code = "empty_dataset" if e.line is None else "invalid_dataset"
        shown = safe_text(f.filename, 200)
        raise _reject(code, f"{shown}: {e}", line=e.line, file=shown, field=e.field, kind=e.kind) from None
    return f, fmt, facts


def create(uow: UnitOfWork, caller: Caller, storage: Storage, files: list[StagedFile], name: str | None) -> Dataset:
    f, fmt, facts = validate_upload(files)
    if name is not None and not NAME_RE.fullmatch(name):
        raise _reject(
            "invalid_name",
            "name must be 1-200 letters, digits, spaces or . : @ + - _ (nothing else, no newline)",
            ["body", "name"],
            field="name",
        )
    if name is None:
        stem = Path(f.filename).stem
        name = stem if NAME_RE.fullmatch(stem) else "dataset"
    quotas.check_storage(uow.session, caller.tenant_id, f.size_bytes)
    dataset_id = new_id()
    prefix = f"datasets/{dataset_id}"
    key = f"{prefix}/data.{fmt}"
    # Registered before the file moves: a failed commit (or flush) must not leave it behind.
    uow.on_rollback(lambda: storage.delete_prefix(prefix))
    try:
        storage.put_file(f.path, key, move=True)
    except BaseException:
        storage.delete_prefix(prefix)
        raise
    ds = Dataset(
        id=dataset_id,
        tenant_id=caller.tenant_id,
        name=name,
        format=fmt,
        size_bytes=f.size_bytes,
        sha256=f.sha256,
        storage_key=key,
        **facts,
    )
    uow.session.add(ds)
    uow.session.flush()
    return ds


def get(uow: UnitOfWork, caller: Caller, dataset_id: str) -> Dataset:
    ds = repository.get(uow.session, caller.tenant_id, dataset_id)
    if ds is None:
        raise NotFound(f"no dataset {dataset_id}")
    return ds


def delete(uow: UnitOfWork, caller: Caller, storage: Storage, dataset_id: str) -> None:
    ds = get(uow, caller, dataset_id)
    # Like models: a queued or running job would otherwise fail when it reads the gone file.
    if repository.active_job_count(uow.session, ds.id):
        raise Conflict("the dataset is used by queued or running jobs; cancel them first", code="dataset_in_use")
    uow.session.delete(ds)
    prefix = ds.storage_key.rsplit("/", 1)[0]
    # After commit only: a rolled-back delete keeps a row whose file must still be there.
    uow.after_commit(lambda: storage.delete_prefix(prefix))
