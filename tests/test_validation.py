"""Upload validation on hand-made files: safetensors headers are checked without any tensor library."""

from __future__ import annotations

import pytest

from core.models.validation import FileRejected, check_filename, check_safetensors, find_remote_code, sniff_magic
from tests.helpers import safetensors_bytes

pytestmark = pytest.mark.unit

MAX = 100 * 1024 * 1024


def _write(tmp_path, header, data, header_len=None):
    p = tmp_path / "w.safetensors"
    p.write_bytes(safetensors_bytes(header, data, header_len))
    return p


def test_valid_header_counts_parameters(tmp_path):
    import torch
    from safetensors.torch import save_file

    p = tmp_path / "real.safetensors"
    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.float16)}, str(p), metadata={"k": "v"})
    assert check_safetensors(p, MAX).parameters == 17


@pytest.mark.parametrize(
    ("header", "data", "header_len", "msg"),
    [
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, None, "outside"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            None,
            "overlaps",
        ),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, None, "gap"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, None, "trailing"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "do not match"),
        ({"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, b"\0", None, "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "shape"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}, b"\0" * 4, None, "exactly"),
        ({"__metadata__": {"k": 1}}, b"", None, "__metadata__"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, 10**9, "outside"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, 10**6, "past the end"),
    ],
)
def test_bad_headers_are_refused(tmp_path, header, data, header_len, msg):
    with pytest.raises(FileRejected) as e:
        check_safetensors(_write(tmp_path, header, data, header_len), MAX)
    assert e.value.code == "invalid_safetensors"
    assert msg in e.value.reason


def test_filenames_and_magic():
    assert check_filename("model-00001-of-00002.safetensors") == "safetensors"
    assert check_filename("tokenizer.json") == "json"
    assert check_filename("merges.txt") == "text"
    for bad, code in [
        ("x.bin", "pickle_refused"),
        ("a/b.json", "bad_filename"),
        ("..json", "bad_filename"),
        ("m.tar.gz", "archive_refused"),
        ("m.7z", "archive_refused"),
        (".hidden.json", "bad_filename"),
        ("tokenizer.model", "unsupported_file_type"),
    ]:
        with pytest.raises(FileRejected) as e:
            check_filename(bad)
        assert e.value.code == code, bad
    with pytest.raises(FileRejected):
        sniff_magic("a.json", b"7z\xbc\xaf\x27\x1c")
    with pytest.raises(FileRejected):
        sniff_magic("a.json", b"\x80\x04\x95")
    sniff_magic("a.json", b'{"a": 1}')


def test_auto_map_is_found_anywhere():
    with pytest.raises(FileRejected):
        find_remote_code("tokenizer_config.json", {"x": [{"auto_map": {}}]})
    find_remote_code("config.json", {"model_type": "gpt2"})


def test_refusals_name_the_clients_file_and_the_field_never_the_staging_file(tmp_path):
    """Uploads are checked in the staging folder under names of the service's own ("part-0001"):
    the messages name the file as the client called it, and the place inside it."""
    staged = tmp_path / "part-0001"
    raw = b'{"__metadata__":{"format":"\\ud800"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    staged.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 4)
    with pytest.raises(FileRejected) as e:
        check_safetensors(staged, MAX, name="model.safetensors")
    assert e.value.code == "invalid_safetensors" and e.value.kind == "json_invalid_string"
    assert e.value.field == "__metadata__.format" and str(e.value).startswith("model.safetensors: header: ")
    assert "part-0001" not in str(e.value) and str(tmp_path) not in str(e.value)


@pytest.mark.parametrize(
    ("header", "kind", "field"),
    [
        (
            '{"a":{"dtype":"F32","shape":[%s],"data_offsets":[0,4]}}' % ("9" * 4301),
            "json_number_too_long",
            "a.shape[0]",
        ),
        ('{"__metadata__":%s}' % ("[" * 5000 + "]" * 5000), "json_too_deep", None),
        (
            '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
            "json_duplicate_key",
            "a",
        ),
        ('{"a":{"dtype":"F32","shape":[Infinity],"data_offsets":[0,4]}}', "json_non_finite_number", "a.shape[0]"),
    ],
)
def test_header_json_is_parsed_strictly(tmp_path, header, kind, field):
    with pytest.raises(FileRejected) as e:
        check_safetensors(_write_raw(tmp_path, header.encode(), b"\0" * 4), MAX)
    assert (e.value.code, e.value.kind) == ("invalid_safetensors", kind)
    if field is not None:
        assert e.value.field == field


def _write_raw(tmp_path, raw: bytes, data: bytes):
    p = tmp_path / "w.safetensors"
    p.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return p


def test_names_that_end_in_a_newline_are_refused():
    for bad in ("model.safetensors\n", "config.json\n", "model-00001-of-00002.safetensors\n"):
        with pytest.raises(FileRejected) as e:
            check_filename(bad)
        assert e.value.code == "bad_filename"
    from app.datasets.service import NAME_RE as DATASET_NAME_RE
    from app.models.service import NAME_RE, SHARD_RE

    assert (
        not NAME_RE.fullmatch("mine\n") and not DATASET_NAME_RE.fullmatch("mine\n") and NAME_RE.fullmatch("mine v1.0")
    )
    assert not SHARD_RE.fullmatch("model-00001-of-00002.safetensors\n")
