"""Supervised fine-tuning: chat/completion JSONL -> masked, packed shards -> SFTTask; and the unigram
tokenizer (``prepare text --tokenizer-kind unigram``), whose corpus the end-to-end runs train on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megaray.data import sft
from megaray.errors import DataError

ASSET = Path(__file__).parent / "assets" / "sft_tiny.jsonl"


@pytest.fixture(scope="module")
def unigram_shards(tmp_path_factory):
    """A small stdlib corpus tokenized with a trained 512-piece unigram tokenizer."""
    from megaray.data.text import prepare_text

    out = tmp_path_factory.mktemp("uni") / "stdlib-uni"
    prepare_text(
        ["stdlib"],
        str(out),
        vocab_size=512,
        stdlib_max_docs=400,
        tokenizer_kind="unigram",
        progress=False,
        verbose=False,
    )
    return str(out)


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory):
    from megaray.data.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    texts = [json.dumps(json.loads(line)) for line in ASSET.read_text().splitlines()] * 20
    train_tokenizer(texts, vocab_size=300).save(str(path))
    return str(path)


def _tiny_gpt(vocab: int = 512, block_size: int = 64):
    from megaray.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig.from_name("debug", vocab_size=vocab, block_size=block_size)).eval()


def test_unigram_corpus_round_trips(unigram_shards, tmp_path):
    from megaray.data.stdlib import build_stdlib_corpus
    from megaray.data.text import load_manifest, manifest_tokenizer

    m = load_manifest(unigram_shards)
    assert m["tokenizer"]["kind"] == "unigram" and m["tokenizer"]["trained"]
    tok = manifest_tokenizer(unigram_shards)
    assert tok.token_to_id("<|endoftext|>") == m["eos_id"] == 0
    root = build_stdlib_corpus(tmp_path / "c", max_docs=50)
    texts = [json.loads(line)["text"].strip() for line in (root / "train.jsonl").read_text().splitlines()]
    texts.append("unseen characters \u2603 \u00e9t\u00e9  two  spaces\n\ttab")  # byte fallback, no <unk>
    for text in texts:
        enc = tok.encode(text, add_special_tokens=False)
        assert tok.token_to_id("<unk>") not in enc.ids
        assert tok.decode(enc.ids) == text


def test_prompt_tokens_contribute_no_loss(bpe_tokenizer):
    from megaray.data.tokenizer import load_tokenizer

    tok = load_tokenizer(bpe_tokenizer)
    recs = []
    for line in ASSET.read_text().splitlines()[:3]:
        msgs, reason, _ = sft.to_messages(json.loads(line))
        assert reason is None
        ids, mask = sft.encode_record(tok, sft.render(msgs), 0)
        recs.append((np.array(ids), np.array(mask)))
    assert sum(len(i) for i, _ in recs) <= 256
    batch, dropped = sft.pack(recs, 255, pad_id=0)
    assert dropped == 0 and batch["input_ids"].shape == (1, 255)
    # the loss counts exactly the completion tokens: every one has a predecessor in its record
    targets = torch.from_numpy(batch["targets"])
    assert int((targets != -1).sum()) == sum(int(m.sum()) for _, m in recs)
    stream = np.concatenate([i for i, _ in recs])
    trained = np.concatenate([m for _, m in recs]).astype(bool)
    assert set(stream[1:][trained[1:]].tolist()) == set(targets[targets != -1].tolist())

    model = _tiny_gpt(tok.get_vocab_size(), 256)
    x, d = torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["doc_ids"])
    logits, loss = model(x, targets, doc_ids=d)
    keep = targets[0] != -1
    ref = F.cross_entropy(logits[0, keep].float(), targets[0, keep])
    torch.testing.assert_close(loss, ref)
    # a prompt position's logits receive no gradient from the loss
    logits = logits.detach().requires_grad_(True)
    F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1).backward()
    assert torch.all(logits.grad[0, ~keep] == 0) and torch.any(logits.grad[0, keep] != 0)


def test_packing_mask_blocks_cross_record_attention():
    model = _tiny_gpt(64)
    rec1 = (np.arange(5, 25), np.ones(20, np.int64))
    rec2 = (np.arange(30, 50), np.ones(20, np.int64))
    other1 = (np.arange(40, 60) % 64, np.ones(20, np.int64))
    a, _ = sft.pack([rec1, rec2], 63, pad_id=0)
    b, _ = sft.pack([other1, rec2], 63, pad_id=0)
    assert a["doc_ids"][0, 20] == 2 and (a["input_ids"][0, 20:40] == b["input_ids"][0, 20:40]).all()
    la = model(torch.from_numpy(a["input_ids"]), doc_ids=torch.from_numpy(a["doc_ids"]))
    lb = model(torch.from_numpy(b["input_ids"]), doc_ids=torch.from_numpy(b["doc_ids"]))
    torch.testing.assert_close(la[0, 20:40], lb[0, 20:40], atol=1e-6, rtol=0)
    # without the document mask record 2 sees record 1 (so the check above can fail)
    assert not torch.allclose(
        model(torch.from_numpy(a["input_ids"]))[0, 20:40], model(torch.from_numpy(b["input_ids"]))[0, 20:40], atol=1e-4
    )


def test_bad_records_are_counted_and_named(bpe_tokenizer, tmp_path):
    src = tmp_path / "mixed.jsonl"
    good = ASSET.read_text().splitlines()
    src.write_text(
        "\n".join(
            [
                good[0],
                '{"prompt": "broken',
                '{"prompt": "no completion here"}',
                '{"prompt": "p", "completion": ""}',
                good[1],
                json.dumps({"prompt": "long " * 300, "completion": "x"}),
                good[2],
            ]
        )
        + "\n"
    )
    m = sft.prepare_sft([str(src)], str(tmp_path / "out"), bpe_tokenizer, max_tokens=200, verbose=False)
    by = m["rejected"]["by_reason"]
    assert by["invalid_json"]["count"] == 1 and by["invalid_json"]["examples"][0].startswith(f"{src}:2: ")
    assert by["missing_keys"]["count"] == 1 and "'completion'" in by["missing_keys"]["examples"][0]
    assert by["missing_keys"]["examples"][0].startswith(f"{src}:3: ")
    assert by["empty_completion"]["examples"][0].startswith(f"{src}:4")
    assert by["too_long"]["count"] == 1 and by["too_long"]["examples"][0].startswith(f"{src}:6: ")
    assert m["rejected"]["total"] == 4
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 3
    assert (tmp_path / "out" / "chat_template.json").is_file()

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl is empty: expected JSONL records"):
        sft.prepare_sft([str(empty)], str(tmp_path / "out2"), bpe_tokenizer, verbose=False)


def _cfg(tmp_path, name, shards, batch_size=2, **train):
    from megaray.families import load_config

    return load_config(
        {
            "name": name,
            "model": {"family": "gpt", "preset": "debug", "vocab_size": 512, "block_size": 128},
            "data": {"shards": shards, "batch_size": batch_size, "num_val_batches": 1, "shuffle_block": 0},
            "train": {
                "warmup_steps": 0,
                "eval_every": 1000,
                "log_every": 1000,
                "zero_stage": 0,
                "precision": "fp32",
                **train,
            },
            "scaling": {"num_workers": 1, "storage_path": str(tmp_path / "runs")},
            "tracking": {"enabled": False},
        }
    )


def _completion_loss(ckpt: str, shards: str) -> float:
    from megaray.train.checkpoint import load_for_inference

    model, _, _ = load_for_inference(ckpt)
    m = sft.load_manifest(shards)
    batch, _ = sft.pack(sft.read_split(shards, m, "train"), 128, m["eos_id"])
    with torch.no_grad():
        _, loss = model(
            *(torch.from_numpy(batch[k]) for k in ("input_ids", "targets")), doc_ids=torch.from_numpy(batch["doc_ids"])
        )
    return float(loss)


def test_finetune_lowers_completion_loss(ray_cluster, unigram_shards, tmp_path):
    """A unigram corpus trains (pre-training run), then `train.task: sft` + `train.init_from` fine-tunes it."""
    from megaray.train.launch import fit

    pre = fit(_cfg(tmp_path, "pre", unigram_shards, max_steps=3, checkpoint_every=3))
    assert pre.checkpoint and np.isfinite(pre.metrics["loss"])
    shards = str(tmp_path / "sft")
    m = sft.prepare_sft([str(ASSET)], shards, pre.checkpoint, max_tokens=129, val_fraction=0.2, verbose=False)
    assert m["tokenizer"]["kind"] == "unigram" and m["rejected"]["total"] == 0
    ft = fit(
        _cfg(
            tmp_path,
            "ft",
            shards,
            batch_size=1,
            task="sft",
            init_from=pre.checkpoint,
            max_steps=25,
            checkpoint_every=25,
            lr=2e-3,
            min_lr=2e-4,
            weight_decay=0.0,
        )
    )
    assert (Path(ft.checkpoint) / "chat_template.json").is_file()
    before, after = _completion_loss(pre.checkpoint, shards), _completion_loss(ft.checkpoint, shards)
    assert after < 0.7 * before, (before, after)
