"""The client side of CI's compose check (.ci/images), run with the host's virtualenv.

compose_e2e.py --url URL --wait-ready SECONDS     wait until GET /readyz answers 200
compose_e2e.py --url URL --api-key KEY [--workers N]
    a tiny GPT-2 (and its word-level tokenizer) saved here -> upload (SDK) -> job
    (prune.magnitude 0.5, then quantize.cast to bfloat16) -> wait -> download -> the
    artifact loads with transformers here, its weight matrices are largely zeros and it gives finite logits.
    --workers N: first wait until N workers are live (GET /v1/workers).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

# quantize.cast: GPT-2 keeps its weights in Conv1D layers, which the compressed-tensors formats skip.
STEPS = [("prune.magnitude", {"sparsity": 0.5}), ("quantize.cast", {"dtype": "bfloat16"})]
EVALUATION = {"runs": 2, "warmup": 1, "seq_len": 16, "batch_size": 2}
TEXT = "the cat sat on the mat and looked at the dog . a dog ran in the park with a red ball"


def wait_ready(url: str, timeout: float) -> None:
    deadline, last = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as r:
                if r.status == 200:
                    return
        except Exception as e:  # noqa: BLE001 - not up yet: connection refused, 503, ...
            last = repr(e)
        time.sleep(1)
    sys.exit(f"the API at {url} was not ready after {timeout:.0f} s ({last})")


def tiny_model(path: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(TEXT.split())))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    ).save_pretrained(path)
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        n_positions=64,
        vocab_size=len(vocab),
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def wait_workers(mp, n: int, timeout: float = 180) -> int:  # noqa: ANN001 - a modelpress.Client
    deadline, live = time.monotonic() + timeout, -1
    while time.monotonic() < deadline:
        resp = mp._http.get("/v1/workers")  # noqa: SLF001 - no SDK method for this endpoint
        resp.raise_for_status()
        body = resp.json()
        items = body.get("items", body) if isinstance(body, dict) else body
        live = sum(1 for w in items if w.get("live", True))
        if live >= n:
            return live
        time.sleep(1)
    sys.exit(f"{live} live worker(s) after {timeout:.0f} s, expected {n}")


def run(url: str, key: str, workers: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from modelpress import Client

    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, Client(url, api_key=key, timeout=120) as mp:
        t = time.monotonic()
        if workers:
            times["live_workers"] = wait_workers(mp, workers)
        src = tiny_model(Path(tmp) / "gpt2")
        t = time.monotonic()
        model = mp.upload_model(src, name="ci-tiny-gpt2")
        times["upload_s"] = time.monotonic() - t
        t = time.monotonic()
        job = mp.submit(model.id, STEPS, evaluation=EVALUATION)
        job = mp.wait(job.id, timeout=600)
        times["job_s"] = time.monotonic() - t
        t = time.monotonic()
        dl = mp.download(job.id, Path(tmp) / "out")
        times["download_s"] = time.monotonic() - t
        out = Path(tmp) / "artifact"
        with zipfile.ZipFile(dl.path) as zf:
            zf.extractall(out)
        loaded = AutoModelForCausalLM.from_pretrained(out)
        # Global magnitude pruning: half of all the prunable weights, not of each layer.
        mats = [p.detach().float() for p in loaded.parameters() if p.dim() == 2]
        zeros = sum(int((m == 0).sum()) for m in mats) / sum(m.numel() for m in mats)
        with torch.no_grad():
            logits = loaded(torch.tensor([[4, 5, 6, 7]])).logits
        assert torch.isfinite(logits).all(), "the artifact gives non-finite logits"
        assert zeros >= 0.3, f"the artifact's weight matrices are {zeros:.0%} zeros after pruning half"
        report = mp.report(job.id)
        return {
            "job": job.id,
            "status": job.status,
            "artifact_bytes": dl.size_bytes,
            "compression_ratio": report.size.get("compression_ratio"),
            "zeros": round(zeros, 3),
            **{k: round(v, 2) for k, v in times.items()},
        }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--api-key")
    ap.add_argument("--wait-ready", type=float)
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()
    if args.wait_ready:
        wait_ready(args.url, args.wait_ready)
        return 0
    print("compose e2e:", json.dumps(run(args.url, args.api_key, args.workers)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
