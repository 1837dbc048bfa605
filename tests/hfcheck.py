"""Load a model directory with plain transformers and describe it. Imports nothing of modelpress:
run as a script (``python tests/hfcheck.py DIR``) it proves an artifact loads without modelpress."""

from __future__ import annotations

import json
import sys


def hf_stats(d: str) -> dict:
    import torch
    from transformers import AutoConfig, AutoModel
    from transformers.pytorch_utils import Conv1D

    cfg = AutoConfig.from_pretrained(d)
    m = AutoModel.from_pretrained(d, dtype="auto")
    emb = {id(m.get_input_embeddings())}
    tot = zeros = 0
    for _, mod in m.named_modules():
        if isinstance(mod, (torch.nn.Linear, Conv1D)) and id(mod) not in emb:
            tot += mod.weight.numel()
            zeros += int((mod.weight == 0).sum())
    return {
        "sparsity": zeros / tot,
        "dtypes": sorted({str(p.dtype) for p in m.parameters()}),
        "model_type": cfg.model_type,
        "class": type(m).__name__,
    }


if __name__ == "__main__":
    stats = hf_stats(sys.argv[1])
    stats["modelpress_imported"] = any(k.split(".")[0] in ("app", "core", "worker", "modelpress") for k in sys.modules)
    print(json.dumps(stats))
