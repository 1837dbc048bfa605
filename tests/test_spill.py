"""Calibration activations past the memory budget go to scratch files (worker/spill.py): the
values read back are the same bytes, so a calibrated method's result does not change, and nothing
is left on disk."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.tokenizer_util import build_models, txt_dataset
from worker import methods, model_io, spill


def _mapped(folder: Path) -> int:
    return open("/proc/self/maps").read().count(str(folder))


@pytest.mark.unit
def test_cache_spills_past_the_budget(tmp_path: Path) -> None:
    from llmcompressor.pipelines.cache import IntermediatesCache

    folder = tmp_path / "act"
    batches = [{"hidden_states": torch.randn(4, 64, 1024), "mask": torch.ones(4, 64)} for _ in range(3)]  # 1 MiB each
    with spill.spill_activations(folder, 2 << 20) as sp:
        cache = IntermediatesCache.from_dataloader(batches, torch.device("cpu"), torch.device("cpu"))
        for i in range(3):
            assert torch.equal(cache.fetch(i)["hidden_states"], batches[i]["hidden_states"])
        # Two fit the 2 MiB budget; the third is a mapping of an (unlinked) scratch file.
        assert (sp.files, sp.spilled) == (1, 1 << 20)
        assert _mapped(folder) == 1
        assert os.listdir(folder) == []  # unlinked as soon as mapped
        del cache
    assert _mapped(folder) == 0
    # Outside the context the library's own offloading is back.
    assert IntermediatesCache.__dict__["_offload_value"].__func__.__module__.startswith("llmcompressor")


@pytest.mark.unit
def test_full_scratch_is_an_oserror_not_a_crash(tmp_path: Path, monkeypatch) -> None:
    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    sp = spill.ActivationSpill(tmp_path / "act", 0)
    with pytest.raises(OSError) as e:
        sp.store(torch.zeros(1 << 18))
    assert e.value.errno == 28 and os.listdir(tmp_path / "act") == []


class _Ctx:
    def __init__(self, work: Path, budget_mb: int) -> None:
        lines = txt_dataset().decode().splitlines()
        self._samples = [{"text": t} for t in lines if t.strip()]
        self.settings = SimpleNamespace(activation_memory_mb=budget_mb)
        self.work_dir = work

    def samples(self, which: str = "train") -> list[dict[str, Any]]:
        return self._samples

    def step_progress(self, note: str, fraction: float) -> None:
        pass


@pytest.mark.integration  # GPTQ on real tiny models
def test_gptq_with_every_activation_spilled_equals_in_memory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(spill, "MIN_SPILL_BYTES", 0)  # the tiny model's activations are small
    src = build_models(tmp_path / "m")["llama"]
    spec = methods.get("quantize.gptq")
    params = spec.params.model_validate({"scheme": "W4A16", "group_size": 32, "num_samples": 8, "max_length": 32})
    outs, metrics = {}, {}
    for name, budget in (("memory", 1024), ("spilled", 0)):
        loaded = model_io.load(src, "hf", tmp_path / f"offload-{name}")
        metrics[name] = spec.handler(loaded, params, _Ctx(tmp_path / f"work-{name}", budget))
        model_io.save(loaded, tmp_path / name, {"test": True})
        outs[name] = load_file(str(tmp_path / name / "model.safetensors"))
    assert metrics["memory"]["activation_files"] == 0
    assert metrics["spilled"]["activation_files"] > 0 and metrics["spilled"]["activation_peak_bytes_in_memory"] == 0
    assert sorted(outs["memory"]) == sorted(outs["spilled"])
    for k, v in outs["memory"].items():
        assert torch.equal(v, outs["spilled"][k]), k
    assert not any((tmp_path / "work-spilled").glob("activations-*"))
