"""formerkit repro: every registered reproduction runs in --quick mode and writes an honest result.json; the data
generators and metrics equal brute-force recomputations; the report and the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from formerkit.cli import main
from formerkit.errors import InputError
from formerkit.repro import REGISTRY, Outcome, Repro, build_report, get, result_dir, run_repro
from formerkit.repro.addition import answer_labels, cascade_length, encode
from formerkit.repro.icl_gd import lsa_model, lsa_predict
from formerkit.repro.icl_regression import (
    best_gd_rate,
    gd_predictions,
    gd_step_feature,
    regression_tokens,
    ridge_predictions,
)
from formerkit.repro.length_gen import IGNORE_INDEX, SEP, task_batch
from formerkit.repro.lr_sensitivity import lr_sensitivity, markov_chain, repeated_markov_batch
from formerkit.repro.report import NOTES_MARKER

KEYS = {"claim", "metric", "value", "threshold", "held", "seed", "seconds"}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_reproduction_runs_quick_and_judges_itself(name, tmp_path, capsys):
    result = run_repro(name, seed=1, quick=True, out=tmp_path)
    out_dir = result_dir(tmp_path, name, 1)
    assert out_dir == tmp_path / name / "seed-1"  # seed 0's run stays where it was
    stored = json.loads((out_dir / "result.json").read_text())
    assert stored == json.loads(json.dumps(result))
    assert KEYS <= set(stored)
    assert isinstance(stored["held"], bool) and stored["seed"] == 1 and stored["quick"] is True
    assert math.isfinite(stored["value"]) and stored["seconds"] > 0
    repro = REGISTRY[name]
    assert stored["threshold"] == repro.threshold
    assert stored["held"] == repro.held(Outcome(stored["value"], stored["checks"]))
    assert stored["pngs"] and all((out_dir / png).stat().st_size > 0 for png in stored["pngs"])
    assert ("HELD" in capsys.readouterr().out)


def test_held_follows_the_threshold_direction_and_every_check():
    def make(direction):
        return Repro("x", "c", "p", "m", 0.5, direction, run=lambda *a: Outcome(0.0))
    assert make("min").held(Outcome(0.5)) and not make("min").held(Outcome(0.49))
    assert make("max").held(Outcome(0.5)) and not make("max").held(Outcome(0.51))
    assert not make("min").held(Outcome(0.9, {"other": False}))
    assert make("min").held(Outcome(0.9, {"other": True}))


def test_addition_encoding_and_cascades_equal_brute_force():
    gen = torch.Generator().manual_seed(0)
    n = 4
    a, b = torch.randint(0, 10**n, (500,), generator=gen), torch.randint(0, 10**n, (500,), generator=gen)
    a[:3], b[:3] = torch.tensor([9999, 1234, 4950]), torch.tensor([1, 8765, 5051])
    ids = encode(a, b, n)
    for row, x, y in zip(ids.tolist(), a.tolist(), b.tolist(), strict=True):
        text = "".join("+" if t == 10 else "=" if t == 11 else str(t) for t in row)
        assert text == f"{x:0{n}d}+{y:0{n}d}={x + y:0{n + 1}d}"
    labels = answer_labels(ids, n)
    assert (labels[:, : 2 * n + 2] == IGNORE_INDEX).all() and (labels[:, 2 * n + 2:] == ids[:, 2 * n + 2:]).all()
    expected = []
    for x, y in zip(a.tolist(), b.tolist(), strict=True):  # carry into digit i: the lower i digits overflow
        carry_in = [(x % 10**i + y % 10**i) >= 10**i for i in range(n)]
        nine = [(x // 10**i % 10 + y // 10**i % 10) == 9 for i in range(n)]
        longest = run = 0
        for i in range(n):
            run = run + 1 if carry_in[i] and nine[i] else 0
            longest = max(longest, run)
        expected.append(longest)
    assert cascade_length(a, b, n).tolist() == expected
    assert expected[:3] == [3, 0, 2]  # 9999+0001 passes a carry through three 9s; 4950+5051 through two


def test_gd_and_ridge_predictions_equal_closed_forms():
    gen = torch.Generator().manual_seed(0)
    tokens, targets = regression_tokens(gen, 300, 8, 3)
    assert (tokens[:, -1, -1] == 0).all()
    x, y = tokens[:, :-1, :-1].double(), tokens[:, :-1, -1].double()
    assert torch.allclose(gd_predictions(tokens, 0.7), 0.7 * gd_step_feature(tokens), atol=1e-6)
    w = torch.zeros(300, 3, dtype=torch.double)
    for _ in range(3):  # the gradient of (1/2N) Σ (w·x_i - y_i)² written out
        w = w - 0.5 * torch.einsum("bn,bnd->bd", torch.einsum("bnd,bd->bn", x, w) - y, x) / x.shape[1]
    assert torch.allclose(gd_predictions(tokens, 0.5, steps=3).double(), (w * tokens[:, -1, :-1]).sum(-1), atol=1e-5)
    eta = best_gd_rate(tokens, targets)
    mse = [float(((gd_predictions(tokens, e) - targets) ** 2).mean()) for e in (eta * 0.95, eta, eta * 1.05)]
    assert mse[1] < mse[0] and mse[1] < mse[2]
    lam = 0.3
    solved = torch.linalg.solve(x.transpose(1, 2) @ x + lam * torch.eye(3, dtype=torch.double),
                                torch.einsum("bnd,bn->bd", x, y))
    assert torch.allclose(ridge_predictions(tokens, lam).double(), (solved * tokens[:, -1, :-1]).sum(-1), atol=1e-4)
    assert torch.allclose(ridge_predictions(tokens, 0.0), targets, atol=1e-3)  # 8 noiseless points in 3 dims


def test_lsa_hooks_make_the_layer_linear_self_attention():
    torch.manual_seed(0)
    model = lsa_model(3, 5, init_std=0.3)
    tokens, _ = regression_tokens(torch.Generator().manual_seed(1), 4, 5, 3)
    block = model.blocks[0]
    h = tokens * block.ln1.weight  # the norm with divisor 1: its diagonal weight
    q, k, v = block.attn.qkv(h).split(4, dim=-1)  # (B, T, 4) each: one head of width d + 1
    scores = (q @ k.transpose(1, 2)) * block.attn.scale  # (B, T, T)
    scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), 0.0)  # causal, no softmax
    expected = (tokens + block.attn.out(scores @ v))[:, -1, -1]
    assert torch.allclose(lsa_predict(model, tokens), expected, atol=1e-5)


def test_copy_and_reverse_batches():
    gen = torch.Generator().manual_seed(0)
    for task in ("copy", "reverse"):
        lengths = torch.tensor([3, 7, 1])
        ids, labels = task_batch(gen, task, lengths)
        assert ids.shape == (3, 15)
        for row, lab, length in zip(ids, labels, lengths.tolist(), strict=True):
            x, out = row[:length], row[length + 1:2 * length + 1]
            assert row[length] == SEP and (out == (x if task == "copy" else x.flip(0))).all()
            assert (lab[length + 1:2 * length + 1] == out).all()
            assert (lab[: length + 1] == IGNORE_INDEX).all() and (lab[2 * length + 1:] == IGNORE_INDEX).all()


def test_markov_data_and_lr_sensitivity():
    gen = torch.Generator().manual_seed(0)
    chain = markov_chain(gen, 16)
    assert torch.allclose(chain.sum(1), torch.ones(16)) and ((chain > 0).sum(1) == 4).all()
    ids = repeated_markov_batch(gen, chain, 5, 12)
    assert (ids[:, :12] == ids[:, 12:]).all()
    assert (chain[ids[:, :11], ids[:, 1:12]] > 0).all()  # every step is a transition the chain allows
    # losses 2, 3, nan (capped at the initial 5), 7 (capped at 5): mean 3.75, best 2
    assert lr_sensitivity([2.0, 3.0, float("nan"), 7.0], 5.0) == pytest.approx(1.75)


def _fake_result(tmp_path, name, quick, seed=0, value=0.5, held=False):
    repro = REGISTRY[name]
    data = {"name": name, "claim": repro.claim, "paper": repro.paper, "metric": repro.metric, "value": value,
            "threshold": repro.threshold, "rule": repro.rule(), "checks": {"a check": held}, "held": held,
            "seed": seed, "seconds": 12.0, "quick": quick, "not_built": "", "table": [["k", "v"], ["x", 0.25]],
            "pngs": ["loss.png"], "machine": {"cpu": "Some CPU", "threads": 1}}
    out_dir = result_dir(tmp_path, name, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "result.json").write_text(json.dumps(data))


def test_report_tables_full_runs_only(tmp_path):
    with pytest.raises(InputError, match="no full run"):
        build_report(tmp_path)
    names = sorted(REGISTRY)
    _fake_result(tmp_path, names[0], quick=False)
    _fake_result(tmp_path, names[1], quick=True)
    text = build_report(tmp_path)
    assert f"| `{names[0]}` |" in text and f"| `{names[1]}` |" not in text
    assert "Some CPU" in text and "failed: a check" in text and "| x | 0.25 |" in text
    assert f"`{names[1]}`" in text.split("Registered but without a full run here:")[1]
    assert "| 0 | one seed |" in text


def test_report_gives_the_spread_over_seeds(tmp_path):
    name = sorted(REGISTRY)[0]
    _fake_result(tmp_path, name, quick=False, seed=0, value=0.5)
    _fake_result(tmp_path, name, quick=False, seed=1, value=0.7, held=True)
    _fake_result(tmp_path, name, quick=False, seed=2, value=0.9)
    _fake_result(tmp_path, name, quick=True, seed=5, value=100.0)  # quick runs never count
    text = build_report(tmp_path)
    row = next(line for line in text.splitlines() if line.startswith(f"| `{name}` |"))
    assert "| 0.5 (" in row  # the row is seed 0's run
    assert "0.7 ± 0.2 (0.5 to 0.9; held 1/3; seeds 0, 1, 2)" in row  # mean ± sample std
    assert "seed 1: 0.7, held; seed 2: 0.9, not held (failed: a check)." in text
    assert f"`{tmp_path / name / 'loss.png'}`" in text


def test_command_line(tmp_path, capsys):
    assert main(["repro", "--list"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines()]
    assert listed == sorted(REGISTRY, key=lambda n: REGISTRY[n].item)  # the order
    assert listed[:3] == ["addition", "length-generalization", "icl-gradient-descent"]
    assert main(["repro", "additon"]) == 2
    assert 'did you mean "addition"' in capsys.readouterr().err
    with pytest.raises(InputError):
        get("nothing")
    _fake_result(tmp_path, "addition", quick=False)
    assert main(["repro", "--report", "--out", str(tmp_path), "--report-path", str(tmp_path / "r.md")]) == 0
    page = tmp_path / "r.md"
    assert "`addition`" in page.read_text()
    page.write_text(page.read_text() + f"\n{NOTES_MARKER}\nkept by hand\n")
    assert main(["repro", "--report", "--out", str(tmp_path), "--report-path", str(page)]) == 0
    text = page.read_text()
    assert text.count(NOTES_MARKER) == 1 and text.endswith("kept by hand\n") and text.count("| `addition` |") == 1


def test_bursty_icl_sequences_hold_what_each_condition_promises():
    from formerkit.repro import bursty_icl as b

    gen = torch.Generator().manual_seed(0)
    probs = b.zipf_probabilities(b.CLASSES)
    assert probs[0] / probs[9] == pytest.approx(10.0) and float(probs.sum()) == pytest.approx(1.0)
    for bursty in (True, False):
        ids, labels = b.training_batch(bursty, 64, probs, gen)
        items, shown = ids[:, 0::2], ids[:, 1::2]  # (B, PAIRS + 1) each
        assert torch.equal(shown, b.fixed_labels()[items])  # every training class keeps its label
        assert (labels[:, :-1] == IGNORE_INDEX).all() and torch.equal(labels[:, -1], ids[:, -1])
        in_context = (items[:, :-1] == items[:, -1:]).sum(1)
        assert (in_context == b.PAIRS // 2).all() if bursty else (in_context < b.PAIRS // 2).float().mean() > 0.9
    ids, _ = b.icl_batch(64, gen)
    items, shown = ids[:, 0::2], ids[:, 1::2]
    assert (items >= b.CLASSES).all() and (items < b.ITEMS).all()  # held-out classes only
    for row_items, row_labels in zip(items.tolist(), shown.tolist(), strict=True):
        mapping = dict(zip(row_items, row_labels, strict=True))
        assert len(mapping) == 2 and len(set(mapping.values())) == 2  # two classes, two labels, one per class
        assert all(mapping[i] == lab for i, lab in zip(row_items, row_labels, strict=True))
    ids, _ = b.iwl_batch(64, gen)
    assert (ids[:, -2] < b.HELD_OUT).all() and not (ids[:, 0:-2:2] == ids[:, -2:-1]).any()


def test_two_way_accuracy_chooses_among_the_labels_the_context_shows():
    from formerkit.repro import bursty_icl as b

    class Fixed(torch.nn.Module):
        """Logits favouring one label token everywhere, whatever the input."""

        def forward(self, ids):
            logits = torch.zeros(*ids.shape, b.ITEMS + b.LABELS)
            logits[..., b.ITEMS + b.LABELS - 1] = 5.0  # a label never in these contexts
            logits[..., b.ITEMS] = 1.0
            return type("Out", (), {"logits": logits})()

    items = torch.tensor([[b.CLASSES] * 4 + [b.CLASSES + 1] * 4 + [b.CLASSES]])
    labels = torch.where(items == b.CLASSES, b.ITEMS, b.ITEMS + 1)
    ids, lm = b.sequences(items, labels)
    assert b.accuracy(Fixed(), ids, lm) == 0.0  # the unseen label wins over every token
    assert b.accuracy(Fixed(), ids, lm, among_context=True) == 1.0  # between the two shown, ITEMS is right
