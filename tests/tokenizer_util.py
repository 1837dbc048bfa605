"""A tiny word-level tokenizer built offline with the ``tokenizers`` library, and tiny models whose
vocabulary matches it, saved side by side so an upload carries its tokenizer (``tokenizer.json`` +
``tokenizer_config.json``: only JSON and text, which the service accepts)."""

from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[CLS]", "[SEP]", "[MASK]"]

CORPUS = """\
the cat sat on the mat and looked at the dog
a dog ran in the park with a red ball
the sun was warm and the sky was blue
she read a good book by the window
we walked to the old house near the river
the children played in the garden after school
he made a cup of tea and sat down
the bird sang a song in the tall tree
it was a cold night and the wind was loud
they cooked dinner and talked about the day
the train left the station at nine
my friend sent me a long letter
the shop on the corner sells fresh bread
a small boat crossed the quiet lake
the teacher wrote a new word on the board
rain fell on the roof all night
the dog slept by the fire
she found a key under the green door
we saw many stars over the hill
the old man told a funny story
"""

# Sentiment-style labels for the classifier tests: by which word a line has, so they are learnable.
POSITIVE = ("good", "warm", "funny", "fresh", "played", "sang")


def sentences() -> list[str]:
    return [line.strip() for line in CORPUS.splitlines() if line.strip()]


def vocab() -> dict[str, int]:
    words = sorted({w for line in sentences() for w in line.split()})
    return {tok: i for i, tok in enumerate(SPECIALS + words)}


def build_tokenizer():  # noqa: ANN201 - a transformers PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab(), unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def _special_ids() -> dict[str, int]:
    v = vocab()
    return {"pad_token_id": v["[PAD]"], "bos_token_id": v["[BOS]"], "eos_token_id": v["[EOS]"]}


def save_with_tokenizer(model, path: Path) -> Path:  # noqa: ANN001
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    names = {p.name for p in path.iterdir()}
    assert names <= {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }, names
    assert "auto_map" not in (path / "tokenizer_config.json").read_text()
    return path


def build_models(root: Path) -> dict[str, Path]:
    """gpt2 / llama (causal LMs, 2 layers), bert-cls (a 2-class BERT classifier, 2 layers) and
    bert-bare (a BertModel without a head), each with the tokenizer; plus gpt2-1layer, a separate
    1-layer GPT-2 with the same tokenizer (a student to upload)."""
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    n = len(vocab())
    ids = _special_ids()
    out: dict[str, Path] = {}
    out["gpt2"] = save_with_tokenizer(
        GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=n, n_positions=64, **ids)), root / "gpt2"
    )
    out["gpt2-1layer"] = save_with_tokenizer(
        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=n, n_positions=64, **ids)),
        root / "gpt2-1layer",
    )
    out["llama"] = save_with_tokenizer(
        LlamaForCausalLM(
            LlamaConfig(
                num_hidden_layers=2,
                hidden_size=32,
                intermediate_size=64,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=n,
                max_position_embeddings=64,
                **ids,
            )
        ),
        root / "llama",
    )
    bert_cfg = dict(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=n,
        max_position_embeddings=64,
        pad_token_id=ids["pad_token_id"],
    )
    out["bert-cls"] = save_with_tokenizer(
        BertForSequenceClassification(BertConfig(num_labels=2, **bert_cfg)), root / "bert-cls"
    )
    out["bert-bare"] = save_with_tokenizer(BertModel(BertConfig(**bert_cfg)), root / "bert-bare")
    return out


def txt_dataset() -> bytes:
    return ("\n".join(sentences()) + "\n").encode()


def labeled_jsonl() -> bytes:
    rows = [{"text": s, "label": "pos" if any(w in s.split() for w in POSITIVE) else "neg"} for s in sentences()]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def build_trained_llama(path: Path, steps: int = 300) -> Path:
    """A tiny Llama trained for a few seconds on the corpus (seeded, deterministic on one machine).
    Random-init weights have none of the activation structure (outlier features) that
    calibration-aware methods exploit; a briefly trained model has some, so comparing Wanda or
    GPTQ with their textbook versions on it means something."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = build_tokenizer()
    model = LlamaForCausalLM(
        LlamaConfig(
            num_hidden_layers=2,
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(vocab()),
            max_position_embeddings=64,
            **_special_ids(),
        )
    )
    enc = tok(sentences(), padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        model(**enc, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    return save_with_tokenizer(model.eval(), path)
