"""``megaray export --format hf``: the exported directory loads in ``transformers`` with equal
logits and a tokenizer that encodes like megaray's; unsupported configs get a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

from conftest import REPO  # noqa: E402

from megaray.cli import app  # noqa: E402
from megaray.config import ConfigError  # noqa: E402
from megaray.data.tokenizer import train_tokenizer  # noqa: E402
from megaray.families import build_model, load_config  # noqa: E402
from megaray.inference.export import export_checkpoint  # noqa: E402
from megaray.train.checkpoint import STATE_FILE, WEIGHTS_FILE  # noqa: E402

TEXTS = [
    "Return the number of items in a container.",
    "If the argument is omitted, None is used.",
    "Raise ValueError when the file cannot be read: it names the path.",
] * 30
SAMPLES = ["Return the value", "  two  spaces and\ttabs\n", "naïve café 東京 ✓", "end<|endoftext|>start", ""]
LLAMA = [
    "model.position=rope",
    "model.norm=rmsnorm",
    "model.mlp=swiglu",
    "model.attention=gqa",
    "model.n_kv_heads=2",
    "model.bias=false",
    "model.tie_embeddings=false",
]


def _checkpoint(root: Path, overrides=()) -> tuple:
    """A text checkpoint as training lays it out (config.yaml, model.pt, megaray.json,
    tokenizer.json), every weight random (norm gains and biases too, so a dropped or swapped
    tensor shows in the logits)."""
    tok = train_tokenizer(TEXTS, vocab_size=300)
    cfg = load_config(REPO / "configs" / "gpt_debug.yaml", list(overrides))
    ckpt = root / "run" / "step_00000002"
    ckpt.mkdir(parents=True)
    cfg.to_yaml(ckpt / "config.yaml")
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                (1.0 if p.dim() == 1 and "ln" in name and name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p)
            )
    torch.save(model.state_dict(), ckpt / WEIGHTS_FILE)
    (ckpt / STATE_FILE).write_text(json.dumps({"step": 2, "tokens": 0}))
    (ckpt / "tokenizer.json").write_text(tok.to_str())
    return ckpt, model, tok


@pytest.mark.parametrize(
    "shape, overrides, arch", [("gpt2", [], "GPT2LMHeadModel"), ("llama", LLAMA, "LlamaForCausalLM")]
)
def test_export_round_trips_to_transformers(tmp_path, shape, overrides, arch):
    ckpt, model, tok = _checkpoint(tmp_path, overrides)
    out = export_checkpoint(ckpt.parent, tmp_path / "hf")
    assert out["architecture"] == arch
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    } <= set(out["files"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == arch
    idx = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-5, rtol=1e-5)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in SAMPLES:
        assert hf_tok(text)["input_ids"] == tok.encode(text).ids, text
        assert hf_tok.decode(tok.encode(text).ids) == tok.decode(tok.encode(text).ids, skip_special_tokens=False)
    assert hf_tok.eos_token == "<|endoftext|>" and hf.config.eos_token_id == tok.token_to_id("<|endoftext|>")


def test_unsupported_configs_are_refused_by_name(tmp_path):
    ckpt, _, _ = _checkpoint(tmp_path, ["model.position=alibi"])
    with pytest.raises(ConfigError, match=r"cannot export to Hugging Face.*position='alibi'"):
        export_checkpoint(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    r = CliRunner().invoke(app, ["export", "--checkpoint", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf")])
    assert r.exit_code == 2 and "error: " in r.output and "position='alibi'" in r.output, r.output
    r = CliRunner().invoke(app, ["export", "--checkpoint", str(ckpt), "--format", "gguf", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--format must be one of hf" in r.output, r.output
