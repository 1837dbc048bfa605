"""Model uploads: classify the uploaded files, validate each one, store them, record the row."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from app import quotas
from app.auth import Caller
from app.config import Settings
from app.db import UnitOfWork
from app.errors import Conflict, NotFound, Unprocessable
from app.models import repository
from app.models.validation import (
    SHARD_RE,
    FileRejected,
    check_filename,
    check_safetensors,
    check_text_file,
    find_remote_code,
    load_json_file,
    sniff_magic,
)
from app.storage import Storage
from app.tables import Model, new_id
from app.uploads import StagedFile

INDEX_NAME = "model.safetensors.index.json"
NAME_RE = re.compile(r"^[\w .:@+-]{1,200}$")


def _reject(code: str, detail: str, loc: list[str | int] | None = None) -> Unprocessable:
    return Unprocessable(detail, code=code, errors=[{"loc": loc or ["body", "files"], "msg": detail, "type": code}])


def _check_hf_weights(by_name: dict[str, StagedFile], index: dict | None) -> None:
    st_names = {n for n in by_name if n.endswith(".safetensors")}
    if "model.safetensors" in st_names:
        if len(st_names) != 1 or index is not None:
            raise _reject("inconsistent_weights", "upload either model.safetensors or sharded model-0000k-of-0000n.safetensors files with model.safetensors.index.json, not both")
        return
    if not st_names:
        raise _reject("missing_weights", "a Hugging Face directory needs model.safetensors or sharded model-0000k-of-0000n.safetensors files")
    bad = sorted(n for n in st_names if not SHARD_RE.match(n))
    if bad:
        raise _reject("unexpected_file", f"unexpected weight files {bad}: expected model.safetensors or model-0000k-of-0000n.safetensors")
    totals = {int(SHARD_RE.match(n).group(2)) for n in st_names}
    if len(totals) != 1 or {int(SHARD_RE.match(n).group(1)) for n in st_names} != set(range(1, totals.pop() + 1)):
        raise _reject("inconsistent_weights", "shards must be numbered 1..n of n, all present")
    if index is None:
        raise _reject("missing_index", f"sharded weights need {INDEX_NAME}")
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise _reject("invalid_index", f"{INDEX_NAME} needs a weight_map of tensor name -> shard file")
    if set(wm.values()) != st_names:
        raise _reject("inconsistent_weights", f"{INDEX_NAME} names shards {sorted(set(wm.values()))} but the upload has {sorted(st_names)}")


def validate_upload(files: list[StagedFile], settings: Settings) -> dict:
    """Return the model's descriptive fields, or raise a 4xx error saying what is wrong."""
    if not files:
        raise _reject("no_files", "send one or more multipart parts named 'files'")
    by_name: dict[str, StagedFile] = {}
    for f in files:
        if f.field != "files":
            raise _reject("unexpected_part", f"unexpected multipart part {f.field!r}; files go in parts named 'files'", ["body", f.field])
        try:
            check_filename(f.filename)
        except FileRejected as e:
            raise _reject(e.code, str(e)) from None
        if f.filename in by_name:
            raise _reject("duplicate_file", f"{f.filename} is uploaded twice")
        by_name[f.filename] = f

    def checked(fn, *args):  # noqa: ANN001, ANN202
        try:
            return fn(*args)
        except FileRejected as e:
            if e.status == 413:
                from app.errors import PayloadTooLarge

                raise PayloadTooLarge(str(e), code=e.code) from None
            raise _reject(e.code, str(e)) from None

    parameters = 0
    configs: dict[str, object] = {}
    for name, f in by_name.items():
        checked(sniff_magic, name, f.head)
        kind = check_filename(name)
        if kind == "safetensors":
            parameters += checked(check_safetensors, f.path, settings.max_safetensors_header_bytes).parameters
        elif kind == "json":
            obj = checked(load_json_file, f.path, settings.max_json_file_bytes)
            checked(find_remote_code, name, obj)
            configs[name] = obj
        else:
            checked(check_text_file, f.path)

    if "config.json" in by_name:
        fmt = "hf"
        config = configs["config.json"]
        if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
            raise _reject("invalid_config", "config.json must be an object with a 'model_type'")
        _check_hf_weights(by_name, configs.get(INDEX_NAME))
        archs = config.get("architectures")
        architecture = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
        if architecture is None:
            raise _reject("invalid_config", "config.json must list the model class in 'architectures' (as save_pretrained writes it)")
    else:
        if len(by_name) != 1 or not next(iter(by_name)).endswith(".safetensors"):
            raise _reject("missing_config", "upload either one *.safetensors file (a bare state dict) or a Hugging Face directory with config.json")
        fmt, architecture = "safetensors", None

    listing = sorted((f.filename, f.sha256) for f in files)
    digest = listing[0][1] if fmt == "safetensors" else hashlib.sha256(
        "".join(f"{sha}  {name}\n" for name, sha in listing).encode()
    ).hexdigest()
    return {
        "format": fmt,
        "architecture": architecture,
        "parameters": parameters,
        "size_bytes": sum(f.size_bytes for f in files),
        "sha256": digest,
        "config": configs.get("config.json") if fmt == "hf" else None,
        "files": [{"name": f.filename, "size_bytes": f.size_bytes, "sha256": f.sha256} for f in sorted(files, key=lambda f: f.filename)],
    }


def create(uow: UnitOfWork, caller: Caller, storage: Storage, settings: Settings, files: list[StagedFile], name: str | None) -> Model:
    info = validate_upload(files, settings)
    if name is not None and not NAME_RE.match(name):
        raise _reject("invalid_name", "name must be 1-200 letters, digits, spaces or . : @ + - _", ["body", "name"])
    quotas.check_storage(uow.session, caller.tenant_id, info["size_bytes"])
    model_id = new_id()
    prefix = f"models/{model_id}"
    uow.on_rollback(lambda: storage.delete_prefix(prefix))
    try:
        for f in files:
            storage.put_file(f.path, f"{prefix}/{f.filename}", move=True)
    except BaseException:
        storage.delete_prefix(prefix)
        raise
    default_name = Path(info["files"][0]["name"]).stem if info["format"] == "safetensors" else (info["architecture"] or "model")
    model = Model(id=model_id, tenant_id=caller.tenant_id, name=name or default_name, storage_prefix=prefix, **info)
    uow.session.add(model)
    uow.session.flush()
    return model


def get(uow: UnitOfWork, caller: Caller, model_id: str) -> Model:
    model = repository.get(uow.session, caller.tenant_id, model_id)
    if model is None:
        raise NotFound(f"no model {model_id}")
    return model


def delete(uow: UnitOfWork, caller: Caller, storage: Storage, model_id: str) -> None:
    model = get(uow, caller, model_id)
    if repository.active_job_count(uow.session, model.id):
        raise Conflict("the model has queued or running jobs; cancel them first", code="model_in_use")
    uow.session.delete(model)
    prefix = model.storage_prefix
    uow.after_commit(lambda: storage.delete_prefix(prefix))
