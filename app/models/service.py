"""Model uploads: classify the uploaded files, validate each one, store them, record the row."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from app import quotas
from app.auth import Caller
from app.models import repository
from app.uploads import StagedFile
from core import jsonsafe
from core.config import Settings
from core.db import UnitOfWork
from core.errors import Conflict, NotFound, PayloadTooLarge, Unprocessable
from core.models.validation import (
    SHARD_RE,
    FileRejected,
    check_filename,
    check_safetensors,
    check_text_file,
    find_remote_code,
    load_json_file,
    sniff_magic,
)
from core.storage import Storage
from core.tables import Model, new_id

INDEX_NAME = "model.safetensors.index.json"
# Used with fullmatch only ("$" matches before a trailing newline). A default name (the
# architecture, the file's stem) must pass it as a given one does.
NAME_RE = re.compile(r"[\w .:@+-]{1,200}")
# A transformers model class (config.json "architectures"): a Python identifier, which also
# keeps path separators, newlines and thousands of characters out of names and columns.
ARCHITECTURE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")
# config.json "model_type": transformers' registry keys ("gpt2", "xlm-roberta", "qwen2_moe").
MODEL_TYPE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
# Bytes per element of the floating dtypes a config may name (torch names and their aliases).
# The worker loads with dtype="auto", i.e. in the config's dtype: one wider than every stored
# floating tensor would silently double (or quadruple) the model in memory.
CONFIG_DTYPES = {
    "float64": 8,
    "double": 8,
    "float32": 4,
    "float": 4,
    "float16": 2,
    "half": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}
FLOAT_TENSOR_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


def _reject(
    code: str,
    detail: str,
    loc: list[str | int] | None = None,
    *,
    file: str | None = None,
    field: str | None = None,
    kind: str | None = None,
) -> Unprocessable:
    err: dict[str, object] = {"loc": loc or ["body", "files"], "msg": detail, "type": kind or code}
    if file is not None:
        err["file"] = file
    if field is not None:
        err["field"] = field
    return Unprocessable(detail, code=code, errors=[err])


def _rejected(e: FileRejected) -> Unprocessable | PayloadTooLarge:
    if e.status == 413:
        return PayloadTooLarge(str(e), code=e.code)
    return _reject(e.code, str(e), file=e.filename, field=e.field, kind=e.kind)


def _listing(names: object) -> str:
    return jsonsafe.safe_text(repr(sorted(names)) if isinstance(names, (set, list)) else repr(names), 300)


def _check_hf_weights(by_name: dict[str, StagedFile], index: dict | None, tensors: dict[str, dict[str, dict]]) -> None:
    """The weight files of an HF directory agree with each other and with the index.
    ``tensors``: each safetensors file's tensors (name -> header entry)."""
    st_names = {n for n in by_name if n.endswith(".safetensors")}
    if "model.safetensors" in st_names:
        if len(st_names) != 1 or index is not None:
            raise _reject(
                "inconsistent_weights",
                "upload either model.safetensors or sharded model-0000k-of-0000n.safetensors files "
                "with model.safetensors.index.json, not both",
            )
        return
    if not st_names:
        raise _reject(
            "missing_weights",
            "a Hugging Face directory needs model.safetensors or sharded model-0000k-of-0000n.safetensors files",
        )
    bad = sorted(n for n in st_names if not SHARD_RE.fullmatch(n))
    if bad:
        raise _reject(
            "unexpected_file",
            f"unexpected weight files {bad}: expected model.safetensors or model-0000k-of-0000n.safetensors",
        )
    totals = {int(SHARD_RE.fullmatch(n).group(2)) for n in st_names}
    if len(totals) != 1 or {int(SHARD_RE.fullmatch(n).group(1)) for n in st_names} != set(range(1, totals.pop() + 1)):
        raise _reject("inconsistent_weights", "shards must be numbered 1..n of n, all present")
    _check_index(index, st_names, _tensor_holders(st_names, tensors))


def _tensor_holders(st_names: set[str], tensors: dict[str, dict[str, dict]]) -> dict[str, str]:
    """Which shard holds each tensor: a tensor in two shards is loaded from whichever the loader
    meets last, so the upload is ambiguous (refused)."""
    holder: dict[str, str] = {}
    for shard in sorted(st_names):
        for tname in tensors.get(shard, {}):
            if tname in holder:
                t = jsonsafe.safe_text(tname, 100)
                raise _reject(
                    "inconsistent_weights",
                    f"tensor {t!r} is in two shards, {holder[tname]} and {shard}",
                    file=shard,
                    field=t,
                )
            holder[tname] = shard
    return holder


def _check_index(index: dict | None, st_names: set[str], holder: dict[str, str]) -> None:
    """The index of sharded weights names exactly the uploaded shards, and each tensor in the shard
    that holds it."""
    if index is None:
        raise _reject("missing_index", f"sharded weights need {INDEX_NAME}")
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise _reject(
            "invalid_index",
            f"{INDEX_NAME} needs a weight_map of tensor name -> shard file",
            file=INDEX_NAME,
            field="weight_map",
        )
    if set(wm.values()) != st_names:
        raise _reject(
            "inconsistent_weights",
            f"{INDEX_NAME} names shards {_listing(set(wm.values()))} but the upload has {sorted(st_names)}",
            file=INDEX_NAME,
            field="weight_map",
        )
    # The index is what transformers loads by: every entry must point at the shard that holds the
    # tensor, and every stored tensor must be in it.
    for tname, shard in wm.items():
        if holder.get(tname) != shard:
            t = jsonsafe.safe_text(tname, 100)
            where = f"it is in {holder[tname]}" if tname in holder else "no shard holds it"
            raise _reject(
                "inconsistent_weights",
                f"{INDEX_NAME}: weight_map puts tensor {t!r} in {shard}, but {where}",
                file=INDEX_NAME,
                field=f"weight_map[{jsonsafe.safe_text(tname, 100)!r}]",
            )
    missing = sorted(set(holder) - set(wm))
    if missing:
        t = jsonsafe.safe_text(missing[0], 100)
        raise _reject(
            "inconsistent_weights",
            f"{INDEX_NAME}: weight_map lacks {len(missing)} tensor(s) of the shards, "
            f"e.g. {t!r} in {holder[missing[0]]}",
            file=INDEX_NAME,
            field="weight_map",
        )


def _check_config(config: object, tensors: dict[str, dict[str, dict]]) -> str:
    """config.json's fields the service relies on; returns the architecture."""
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise _reject(
            "invalid_config",
            "config.json must be an object with a 'model_type'",
            file="config.json",
            field="model_type",
        )
    if not MODEL_TYPE_RE.fullmatch(config["model_type"]):
        raise _reject(
            "invalid_config",
            "config.json: model_type must be 1-100 letters, digits, '_', '.' or '-' (a transformers model type)",
            file="config.json",
            field="model_type",
        )
    archs = config.get("architectures")
    architecture = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    if architecture is None:
        raise _reject(
            "invalid_config",
            "config.json must list the model class in 'architectures' (as save_pretrained writes it)",
            file="config.json",
            field="architectures",
        )
    for i, arch in enumerate(archs):
        if not isinstance(arch, str) or not ARCHITECTURE_RE.fullmatch(arch):
            raise _reject(
                "invalid_config",
                f"config.json: architectures[{i}] must be a model class name (a Python identifier of at most "
                f"200 characters), not {jsonsafe.safe_text(repr(arch), 60)}",
                file="config.json",
                field=f"architectures[{i}]",
            )
    widest = max((FLOAT_TENSOR_BYTES.get(t.get("dtype"), 0) for ts in tensors.values() for t in ts.values()), default=0)
    for key in ("torch_dtype", "dtype"):  # transformers 5 writes "dtype", older versions "torch_dtype"
        value = config.get(key)
        if value is None or value == "auto":
            continue
        name = value.removeprefix("torch.") if isinstance(value, str) else None
        if name not in CONFIG_DTYPES:
            raise _reject(
                "invalid_config",
                f"config.json: {key} must be one of {sorted(CONFIG_DTYPES)} or null, not "
                f"{jsonsafe.safe_text(repr(value), 60)}",
                file="config.json",
                field=key,
            )
        if widest and CONFIG_DTYPES[name] > widest:
            raise _reject(
                "config_dtype_widens",
                f"config.json: {key} {name} is wider than every floating tensor of the weights "
                f"({widest * 8}-bit at most): loading would silently widen the model; set it to the weights' dtype",
                file="config.json",
                field=key,
            )
    return architecture


def validate_upload(files: list[StagedFile], settings: Settings) -> dict:
    """Return the model's descriptive fields, or raise a 4xx error saying what is wrong."""
    by_name = _files_by_name(files)
    parameters, configs, tensors = _inspect_files(by_name, settings)
    fmt, architecture = _format_of(by_name, configs, tensors)
    listing = sorted((f.filename, f.sha256) for f in files)
    digest = (
        listing[0][1]
        if fmt == "safetensors"
        else hashlib.sha256("".join(f"{sha}  {name}\n" for name, sha in listing).encode()).hexdigest()
    )
    return {
        "format": fmt,
        "architecture": architecture,
        "parameters": parameters,
        "size_bytes": sum(f.size_bytes for f in files),
        "sha256": digest,
        "config": configs.get("config.json") if fmt == "hf" else None,
        "files": [
            {"name": f.filename, "size_bytes": f.size_bytes, "sha256": f.sha256}
            for f in sorted(files, key=lambda f: f.filename)
        ],
    }


def _files_by_name(files: list[StagedFile]) -> dict[str, StagedFile]:
    """The uploaded files by their (checked, unique) names: every part must be a ``files`` part."""
    if not files:
        raise _reject("no_files", "send one or more multipart parts named 'files'")
    by_name: dict[str, StagedFile] = {}
    for f in files:
        if f.field != "files":
            part = jsonsafe.safe_text(f.field, 60)
            raise _reject(
                "unexpected_part",
                f"unexpected multipart part {part!r}; files go in parts named 'files'",
                ["body", part],
            )
        _checked(check_filename, f.filename)
        if f.filename in by_name:
            raise _reject("duplicate_file", f"{f.filename} is uploaded twice", file=f.filename)
        by_name[f.filename] = f
    return by_name


def _checked(fn, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
    """``fn(*args, **kw)``, its ``FileRejected`` turned into the API's error."""
    try:
        return fn(*args, **kw)
    except FileRejected as e:
        raise _rejected(e) from None


def _inspect_files(
    by_name: dict[str, StagedFile], settings: Settings
) -> tuple[int, dict[str, object], dict[str, dict[str, dict]]]:
    """Check each file by its kind: the parameter count, the JSON files read, and each safetensors
    file's tensors (name -> header entry)."""
    parameters = 0
    configs: dict[str, object] = {}
    tensors: dict[str, dict[str, dict]] = {}
    for name, f in by_name.items():
        _checked(sniff_magic, name, f.head)
        kind = check_filename(name)
        # f.path is the staging file ("part-0001"): the checks name the client's file instead.
        if kind == "safetensors":
            info = _checked(check_safetensors, f.path, settings.max_safetensors_header_bytes, name=name)
            parameters += info.parameters
            tensors[name] = info.tensors
        elif kind == "json":
            obj = _checked(load_json_file, f.path, settings.max_json_file_bytes, name=name)
            _checked(find_remote_code, name, obj)
            configs[name] = obj
        else:
            _checked(check_text_file, f.path, name=name)
    return parameters, configs, tensors


def _format_of(
    by_name: dict[str, StagedFile], configs: dict[str, object], tensors: dict[str, dict[str, dict]]
) -> tuple[str, str | None]:
    """``("hf", architecture)`` for a checked Hugging Face directory, ``("safetensors", None)`` for
    one bare state dict."""
    if "config.json" not in by_name:
        if len(by_name) != 1 or not next(iter(by_name)).endswith(".safetensors"):
            raise _reject(
                "missing_config",
                "upload either one *.safetensors file (a bare state dict) or a Hugging Face directory with config.json",
            )
        return "safetensors", None
    config = configs["config.json"]
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise _reject(
            "invalid_config",
            "config.json must be an object with a 'model_type'",
            file="config.json",
            field="model_type",
        )
    _check_hf_weights(by_name, configs.get(INDEX_NAME), tensors)
    return "hf", _check_config(config, tensors)


def check_name(name: str | None) -> None:
    """A given model name obeys NAME_RE (422 ``invalid_name`` otherwise)."""
    if name is not None and not NAME_RE.fullmatch(name):
        raise _reject(
            "invalid_name",
            "name must be 1-200 letters, digits, spaces or . : @ + - _ (nothing else, no newline)",
            ["body", "name"],
            field="name",
        )


def check_file_names(names: list[str]) -> None:
    """The checks an upload of files with these names meets before any byte is read (plain names,
    accepted types, no duplicates), with the same errors: an import runs them before fetching."""
    _files_by_name([StagedFile("files", n, Path(), 0, "", b"") for n in names])


def store_files(storage: Storage, files: list[StagedFile], prefix: str) -> None:
    """Store the staged (validated) files under ``prefix``; on any failure none stays stored."""
    try:
        for f in files:
            storage.put_file(f.path, f"{prefix}/{f.filename}", move=True)
    except BaseException:
        storage.delete_prefix(prefix)
        raise


def default_name(info: dict) -> str:
    """An upload's name when none is given: the file's stem (bare safetensors) or the architecture."""
    name = Path(info["files"][0]["name"]).stem if info["format"] == "safetensors" else (info["architecture"] or "model")
    return name if NAME_RE.fullmatch(name) else "model"  # a derived name obeys the rule of a given one


def create(
    uow: UnitOfWork, caller: Caller, storage: Storage, settings: Settings, files: list[StagedFile], name: str | None
) -> Model:
    info = validate_upload(files, settings)
    check_name(name)
    quotas.check_storage(uow.session, caller.tenant_id, info["size_bytes"])
    model_id = new_id()
    prefix = f"models/{model_id}"
    uow.on_rollback(lambda: storage.delete_prefix(prefix))
    store_files(storage, files, prefix)
    model = Model(
        id=model_id, tenant_id=caller.tenant_id, name=name or default_name(info), storage_prefix=prefix, **info
    )
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
    # models/<id>: an upload's storage_prefix; for an import, the folder of its attempts (the
    # storage_prefix of a ready one is models/<id>/import-<attempt>, and a killed attempt may have
    # left another beside it).
    prefixes = dict.fromkeys((model.storage_prefix, f"models/{model.id}"))

    def remove() -> None:
        for prefix in prefixes:
            storage.delete_prefix(prefix)

    uow.after_commit(remove)
