"""The submit-time rule for outputs only an optional runtime can make (app/jobs/service.py
``_check_fleet_runtime``), on fleets built here: refused only when every live worker of the queue
published its runtimes and none has the one needed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from app.jobs import service
from core.errors import Unprocessable
from core.exports import OutputIn, required_runtime
from core.jobs.schemas import JobIn

pytestmark = pytest.mark.unit

CONFIG = {"model_type": "llama", "torch_dtype": "bfloat16"}


def _uow(runtimes: list[list[str] | None]) -> SimpleNamespace:
    # _live() reads the queue's live workers from the session's cache first.
    workers = [SimpleNamespace(runtimes=r) for r in runtimes]
    return SimpleNamespace(session=SimpleNamespace(info={"live_workers": {"cpu": workers}}))


def _check(runtimes: list[list[str] | None], output: dict) -> None:
    body = JobIn.model_validate({"model_id": "m", "output": output})
    service._check_fleet_runtime(_uow(runtimes), body, SimpleNamespace(config=CONFIG), [], "cpu")


def test_only_q4_k_m_needs_a_runtime() -> None:
    from pydantic import TypeAdapter

    def out(d: dict) -> dict:
        return TypeAdapter(OutputIn).validate_python(d).model_dump()

    assert required_runtime(out({"format": "gguf", "type": "Q4_K_M"}), [], CONFIG) == "llama_cpp"
    for t in ("auto", "F16", "BF16", "Q8_0", "Q4_0"):
        assert required_runtime(out({"format": "gguf", "type": t}), [], CONFIG) is None
    assert required_runtime(out({"format": "onnx", "quantize": "int8_dynamic"}), [], CONFIG) is None
    assert required_runtime(out({"format": "safetensors"}), [], CONFIG) is None


@pytest.mark.parametrize(
    ("fleet", "refused"),
    [
        ([], False),  # no live worker: unknown
        ([["onnxruntime"]], True),
        ([[], ["onnxruntime"]], True),
        ([["onnxruntime"], None], False),  # one published nothing: it may have it
        ([["onnxruntime"], ["llama_cpp"]], False),
    ],
)
def test_q4_k_m_refused_only_when_no_live_worker_can(fleet, refused) -> None:
    q4km = {"format": "gguf", "type": "Q4_K_M"}
    if refused:
        with pytest.raises(Unprocessable) as e:
            _check(fleet, q4km)
        assert e.value.code == "output_runtime_unavailable"
        assert "llama-cpp-python" in str(e.value.detail) and f"{len(fleet)} live cpu workers" in str(e.value.detail)
    else:
        _check(fleet, q4km)
    _check(fleet, {"format": "gguf", "type": "Q8_0"})  # never needs one
