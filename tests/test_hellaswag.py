"""HellaSwag scoring (``megaray eval --task hellaswag``): equal to a direct per-example computation
on a tiny model, in process and over Ray Data; bad lines counted and named; logged to MLflow."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from typer.testing import CliRunner

from megaray.cli import app
from megaray.data.tokenizer import train_tokenizer
from megaray.families import build_model, load_config
from megaray.inference.hellaswag import evaluate_hellaswag
from megaray.tasks.hellaswag import accuracy, read_hellaswag, score, shared_metrics
from megaray.train.checkpoint import STATE_FILE, WEIGHTS_FILE

BLOCK = 64
GOOD = [
    {
        "ctx": "A man is sitting on a roof. he",
        "label": 3,
        "endings": [
            "is using wrap to wrap a pair of skis.",
            "is ripping level tiles off.",
            "is holding a rubik's cube.",
            "starts pulling up roofing on a roof.",
        ],
    },
    {
        "ctx": "The function returns",
        "label": 0,
        "endings": ["the value of the attribute.", "a cat", "the list of names in the module and its parents.", "zero"],
    },
    {
        "ctx": "Return a new",
        "label": "2",  # the HF datasets copy stores labels as strings
        "endings": ["dictionary.", "object with the same value as the argument given.", "string", "set."],
    },
    # longer than the model's context: the context is cut from the left, the endings stay whole
    {
        "ctx": "Read the file and return its contents as bytes. " * 12 + "Then it",
        "label": 1,
        "endings": ["closes the file.", "raises an error.", "opens a socket to the server.", "does nothing at all."],
    },
    {
        "ctx": "If the argument is omitted,",
        "label": 1,
        "endings": ["the default is used.", "nothing happens.", "an exception is raised.", "it returns None."],
    },
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A text checkpoint as ``load_for_inference`` reads it: config.yaml, model.pt (random
    weights), megaray.json and the tokenizer.json of a BPE trained on a few sentences."""
    root = tmp_path_factory.mktemp("hellaswag")
    texts = [e for ex in GOOD for e in [ex["ctx"], *ex["endings"]]] * 20
    tok = train_tokenizer(texts, vocab_size=300)
    cfg = load_config(REPO / "configs" / "gpt_debug.yaml", [f"model.block_size={BLOCK}"])
    ckpt = root / "run" / "step_00000004"
    ckpt.mkdir(parents=True)
    cfg.to_yaml(ckpt / "config.yaml")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    torch.save(model.state_dict(), ckpt / WEIGHTS_FILE)
    (ckpt / STATE_FILE).write_text(json.dumps({"step": 4, "tokens": 0}))
    (ckpt / "tokenizer.json").write_text(tok.to_str())
    lines = [
        json.dumps(GOOD[0]),
        json.dumps(GOOD[1]),
        "{not json",
        json.dumps(GOOD[2]),
        json.dumps({"ctx": "x", "endings": ["a", "b", "c", "d"]}),  # no label
        json.dumps({**GOOD[0], "label": 7}),
        json.dumps({**GOOD[0], "endings": ["a", "b", "c"]}),
        "",
        json.dumps(GOOD[3]),
        json.dumps(GOOD[4]),
    ]
    data = root / "hellaswag.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return ckpt, data, tok, model.eval()


def _direct(model, tok, ex):
    """The 4 ending losses of one example computed directly: sum and mean of -log p(token) over
    the ending tokens, the context cut from the left to the model's context when needed."""
    ctx = tok.encode(ex["ctx"]).ids
    endings = [tok.encode(" " + e).ids for e in ex["endings"]]
    ctx = ctx[len(ctx) - min(len(ctx), BLOCK + 1 - max(map(len, endings))) :]
    sums, means = [], []
    for e in endings:
        ids = torch.tensor([ctx + e])
        with torch.no_grad():
            logp = F.log_softmax(model(ids[:, :-1])[0].double(), dim=-1)
        nll = [-logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(e)]
        sums.append(sum(nll))
        means.append(sum(nll) / len(nll))
    return sums, means


def test_scoring_equals_a_direct_per_example_computation(checkpoint, tmp_path):
    ckpt, data, tok, model = checkpoint
    preds = tmp_path / "preds.jsonl"
    out = evaluate_hellaswag(str(ckpt.parent), str(data), predictions=str(preds))
    got = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r["line"] for r in got] == [1, 2, 4, 9, 10]
    correct = correct_norm = 0
    for ex, r in zip(GOOD, got):
        sums, means = _direct(model, tok, ex)
        torch.testing.assert_close(
            torch.tensor(r["sum_loss"]), torch.tensor(sums, dtype=torch.float32), atol=1e-4, rtol=1e-5
        )
        torch.testing.assert_close(
            torch.tensor(r["mean_loss"]), torch.tensor(means, dtype=torch.float32), atol=1e-5, rtol=1e-5
        )
        assert r["pred"] == min(range(4), key=sums.__getitem__)
        assert r["pred_norm"] == min(range(4), key=means.__getitem__)
        assert r["label"] == int(ex["label"])
        correct += r["pred"] == r["label"]
        correct_norm += r["pred_norm"] == r["label"]
    assert out["examples"] == 5 and out["backend"] == "in_process" and out["truncated"] == 1
    assert out["acc"] == pytest.approx(correct / 5) and out["acc_norm"] == pytest.approx(correct_norm / 5)
    assert out["bad_lines"] == 4
    assert out["bad"] == {
        "not JSON": [3],
        "missing key 'label'": [5],
        "label not in 0..3": [6],
        "endings is not a list of 4 non-empty strings": [7],
    }


def test_rank_shares_average_to_the_whole_file(checkpoint):
    """What LMTask's periodic evaluation reports: the mean over ranks of each rank's scaled share."""
    _, data, tok, model = checkpoint
    examples = read_hellaswag(data, tok, BLOCK).examples
    whole = accuracy(score(model, examples, "cpu"))
    for world in (2, 3):
        shares = [shared_metrics(model, examples, r, world, "cpu", batch_examples=1) for r in range(world)]
        assert sum(s["hellaswag_acc"] for s in shares) / world == pytest.approx(whole["acc"])
        assert sum(s["hellaswag_acc_norm"] for s in shares) / world == pytest.approx(whole["acc_norm"])


def test_cli_logs_to_mlflow_and_names_a_missing_file(checkpoint, tmp_path):
    from mlflow.tracking import MlflowClient

    ckpt, data, _, _ = checkpoint
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = CliRunner().invoke(
        app,
        [
            "eval",
            "--task",
            "hellaswag",
            "--data",
            str(data),
            "--checkpoint",
            str(ckpt),
            "--tracking-uri",
            uri,
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    run = MlflowClient(uri).get_run(out["mlflow_run_id"])
    assert run.data.metrics["hellaswag_acc"] == pytest.approx(out["acc"])
    assert run.data.metrics["hellaswag_acc_norm"] == pytest.approx(out["acc_norm"])
    assert run.data.params["bad_lines"] == "4"
    r = CliRunner().invoke(
        app, ["eval", "--task", "hellaswag", "--data", str(tmp_path / "no.jsonl"), "--checkpoint", str(ckpt)]
    )
    assert r.exit_code == 2 and "error: HellaSwag file not found" in r.output and "no.jsonl" in r.output
    empty = tmp_path / "bad.jsonl"
    empty.write_text("{oops\n")
    r = CliRunner().invoke(app, ["eval", "--task", "hellaswag", "--data", str(empty), "--checkpoint", str(ckpt)])
    assert r.exit_code == 2 and "no usable HellaSwag example" in r.output and "not JSON (line 1)" in r.output


def test_ray_data_scoring_equals_in_process(checkpoint, ray_local):
    ckpt, data, _, _ = checkpoint
    local = evaluate_hellaswag(str(ckpt), str(data))
    over_ray = evaluate_hellaswag(str(ckpt), str(data), ray_above=0, batch_examples=2)
    assert over_ray["backend"] == "ray_data" and over_ray["examples"] == 5
    assert (over_ray["acc"], over_ray["acc_norm"]) == (local["acc"], local["acc_norm"])
