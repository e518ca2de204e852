"""Distillation: each loss against a brute-force recomputation, the Distiller on real models, `formerkit distill`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from formerkit.checkpoints import from_pretrained, save_pretrained
from formerkit.cli import main
from formerkit.compress.distill import Distiller, DistillSettings, capture_attention, check_pair, distill
from formerkit.compress.distill_init import init_from_teacher, spaced_layers
from formerkit.compress.distill_losses import (
    attention_kl,
    kd_loss,
    mix_losses,
    multihead_relation_kl,
    relation_scores,
    value_relation_kl,
)
from formerkit.config import ModelConfig
from formerkit.errors import ConfigError, InputError
from formerkit.interp.run import run_with_cache, run_with_hooks
from formerkit.model import Transformer
from formerkit.tokenizers import ByteTokenizer
from formerkit.train.config import OptimSection

VOCAB = ByteTokenizer().vocab_size
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest on a busy CPU


def _kl_row(p_logits: list[float], q_logits: list[float]) -> float:
    """KL(softmax(p) || softmax(q)) of one row of finite-or-masked scores, with plain Python floats."""
    def probs(row):
        top = max(row)
        e = [math.exp(v - top) if v > -1e30 else 0.0 for v in row]
        return [v / sum(e) for v in e]
    p, q = probs(p_logits), probs(q_logits)
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def test_kd_loss_equals_the_formula_with_temperature_and_mask():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g) * 3, torch.randn(2, 5, 7, generator=g) * 3
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    T = 2.5
    terms = [_kl_row((t[b, i] / T).tolist(), (s[b, i] / T).tolist()) for b in range(2) for i in range(5) if mask[b, i]]
    expected = T**2 * sum(terms) / len(terms)
    assert kd_loss(s, t, T, mask).item() == pytest.approx(expected, rel=1e-5)
    every = [_kl_row(t[b, i].tolist(), s[b, i].tolist()) for b in range(2) for i in range(5)]
    assert kd_loss(s, t).item() == pytest.approx(sum(every) / 10, rel=1e-5)
    assert mix_losses(torch.tensor(2.0), torch.tensor(6.0), 0.25).item() == pytest.approx(0.25 * 2 + 0.75 * 6)


def test_kd_is_zero_with_zero_gradient_when_the_student_is_the_teacher():
    logits = torch.randn(3, 4, 11)
    student = logits.clone().requires_grad_(True)
    loss = kd_loss(student, logits, 3.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert student.grad.abs().max().item() < 1e-6
    other = torch.randn(3, 4, 11, requires_grad=True)
    kd_loss(other, logits, 3.0).backward()
    assert other.grad.abs().max().item() > 1e-4


def _masked_scores(B, H, T, mask, causal, g):
    scores = torch.randn(B, H, T, T, generator=g) * 2
    low = torch.finfo(torch.float32).min
    scores = scores.masked_fill(~mask[:, None, None, :].bool(), low)
    if causal:
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), low)
    return scores


def test_attention_kl_equals_brute_force_over_heads_and_real_queries():
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    t, s = _masked_scores(2, 3, 4, mask, True, g), _masked_scores(2, 3, 4, mask, True, g)
    rows = [_kl_row(t[b, h, i].tolist(), s[b, h, i].tolist())
            for b in range(2) for h in range(3) for i in range(4) if mask[b, i]]
    assert attention_kl(t, s, mask).item() == pytest.approx(sum(rows) / len(rows), rel=1e-5)
    assert attention_kl(t, t.clone(), mask).item() == pytest.approx(0.0, abs=1e-7)


def _relation(x: torch.Tensor, b: int, r: int, i: int, j: int, width: int) -> float:
    """One relation score x_r[i] . x_r[j] / sqrt(width) with x (B, T, C) split into relation heads of ``width``."""
    lo = r * width
    return sum(x[b, i, lo + c].item() * x[b, j, lo + c].item() for c in range(width)) / math.sqrt(width)


def _brute_relation_kl(tx: torch.Tensor, sx: torch.Tensor, R: int, mask: torch.Tensor, causal: bool) -> float:
    """Mean KL of softmax relations over relation heads and real queries, keys masked by padding and causality."""
    B, T = mask.shape
    tw, sw = tx.shape[-1] // R, sx.shape[-1] // R
    total, count = 0.0, 0
    for b in range(B):
        for r in range(R):
            for i in range(T):
                if not mask[b, i]:
                    continue
                keys = [j for j in range(T) if mask[b, j] and (not causal or j <= i)]
                p = [_relation(tx, b, r, i, j, tw) for j in keys]
                q = [_relation(sx, b, r, i, j, sw) for j in keys]
                total += _kl_row(p, q)
                count += 1
    return total / count


@pytest.mark.parametrize("causal", [False, True])
def test_value_relation_kl_equals_brute_force(causal):
    g = torch.Generator().manual_seed(2)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    tv, sv = torch.randn(2, 5, 2, 6, generator=g), torch.randn(2, 5, 2, 3, generator=g)  # same heads, other widths
    # per-head relations = relation heads over the concatenation, one per model head
    expected = _brute_relation_kl(tv.flatten(2), sv.flatten(2), 2, mask, causal)
    assert value_relation_kl(tv, sv, mask, causal).item() == pytest.approx(expected, rel=1e-5)


def test_minilmv2_relations_across_head_counts_and_widths_equal_brute_force():
    g = torch.Generator().manual_seed(3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    teacher = {k: torch.randn(2, 4, 4, 6, generator=g) for k in "qkv"}  # 4 heads of 6: width 24
    student = {k: torch.randn(2, 4, 2, 4, generator=g) for k in "qkv"}  # 2 heads of 4: width 8
    expected = sum(_brute_relation_kl(teacher[k].flatten(2), student[k].flatten(2), 4, mask, False) for k in "qkv")
    assert multihead_relation_kl(teacher, student, 4, mask).item() == pytest.approx(expected, rel=1e-5)
    assert relation_scores(teacher["q"], 4).shape == (2, 4, 4, 4)
    with pytest.raises(InputError, match="relation heads do not divide"):
        multihead_relation_kl(teacher, student, 5, mask)
    with pytest.raises(InputError, match="equal head counts"):
        value_relation_kl(teacher["v"], student["v"], mask)


def _model(preset: str, seed: int, **overrides) -> Transformer:
    torch.manual_seed(seed)
    fields = {"n_layers": 2, "d_model": 32, "n_heads": 4, "d_ff": 64, "vocab_size": VOCAB, "max_seq_len": 32,
              "attn_dropout": 0.0, "resid_dropout": 0.0, "embed_dropout": 0.0} | overrides
    if preset == "llama":
        fields = {k: v for k, v in fields.items() if not k.endswith("dropout")}
    return Transformer(ModelConfig.from_preset(preset, **fields))


def _copy(model: Transformer) -> Transformer:
    twin = Transformer(model.config)
    twin.load_state_dict(model.state_dict())
    return twin


CASES = [("gpt2", {}, "causal"), ("llama", {"n_kv_heads": 2}, "causal"), ("bert-base", {}, "mlm"),
         ("bert-base", {"head": "classifier", "num_labels": 3, "pooling": "cls"}, "classify")]


def _batch(task: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 256, (2, 8), generator=g)
    if task == "causal":
        return {"x": x, "y": torch.randint(0, 256, (2, 8), generator=g)}
    if task == "mlm":
        labels = torch.full_like(x, -100)
        labels[:, [1, 4]] = x[:, [1, 4]]
        return {"x": x, "labels": labels}
    return {"x": x, "mask": torch.tensor([[1] * 8, [1] * 5 + [0] * 3]), "labels": torch.tensor([0, 2])}


@pytest.mark.parametrize(("preset", "extra", "task"), CASES)
def test_distiller_losses_vanish_for_identical_models_and_not_otherwise(preset, extra, task):
    teacher = _model(preset, 0, **extra)
    settings = DistillSettings(temperature=2.0, alpha=0.7, attention_weight=1.0)
    same = Distiller(teacher, _copy(teacher), settings).losses(_batch(task))
    assert same["kd"].item() == pytest.approx(0.0, abs=1e-6)
    assert same["attention"].item() == pytest.approx(0.0, abs=1e-6)
    assert same["loss"].item() == pytest.approx(0.3 * same["task"].item(), rel=1e-5)
    other = Distiller(teacher, _model(preset, 1, **extra), settings)
    parts = other.losses(_batch(task))
    assert parts["kd"].item() > 1e-4 and parts["attention"].item() > 1e-4
    parts["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert other.student.blocks[-1].attn.qkv.weight.grad.abs().sum() > 0  # the attention loss reaches q, k, v


def test_attention_loss_matches_the_captured_patterns_and_minilmv2_runs_across_sizes():
    teacher = _model("gpt2", 0)
    x = _batch("causal")["x"]
    with capture_attention(teacher, scores=True) as acts, torch.no_grad():
        teacher(x)
    pattern = torch.softmax(acts["attn_scores"], -1)
    with torch.no_grad():  # the recorded scores are the ones the layer attends with
        _, cache = run_with_cache(teacher, x, names_filter="blocks.1.attn.hook_pattern")
    assert torch.allclose(pattern, cache["blocks.1.attn.hook_pattern"], atol=1e-6)
    small = _model("gpt2", 2, d_model=24, n_heads=2, n_layers=1)  # other heads, width and depth
    d = Distiller(teacher, small, DistillSettings(attention_weight=1.0))
    assert d.relation_heads == 2 and not d.same_heads
    assert d.losses(_batch("causal"))["attention"].item() > 0
    same = Distiller(teacher, _copy(teacher), DistillSettings(attention_weight=1.0, relation_heads=8))
    assert same.losses(_batch("causal"))["attention"].item() == pytest.approx(0.0, abs=1e-6)


class _Fixed:
    """A tiny objective: one fixed batch, evaluation = the student's KD loss to the teacher."""

    def __init__(self, task: str, teacher: Transformer) -> None:
        self.batch, self.teacher = _batch(task), teacher

    def train_batch(self, step: int) -> dict[str, torch.Tensor]:
        return self.batch

    @torch.no_grad()
    def evaluate(self, model, device, autocast) -> dict[str, float]:
        return {"kd": kd_loss(model(self.batch["x"]).logits, self.teacher(self.batch["x"]).logits).item()}


def test_distill_loop_brings_the_student_towards_the_teacher():
    teacher, student = _model("gpt2", 0), _model("gpt2", 1, n_layers=1)
    objective = _Fixed("causal", teacher)
    before = objective.evaluate(student, None, None)["kd"]
    result = distill(Distiller(teacher, student, DistillSettings(alpha=1.0, attention_weight=0.5)), objective,
                     steps=12, optim=OptimSection(lr=1e-2, warmup_steps=2))
    assert result.student["kd"] < 0.5 * before
    assert result.teacher["kd"] == pytest.approx(0.0, abs=1e-6)


def test_bad_pairs_and_settings_are_refused_clearly():
    teacher = _model("gpt2", 0)
    with pytest.raises(ConfigError, match="vocab_size is 259 but the student's 300"):
        check_pair(teacher, _model("gpt2", 1, vocab_size=300))
    with pytest.raises(ConfigError, match="causal model but the student a mlm"):
        check_pair(teacher, _model("bert-base", 1))
    with pytest.raises(InputError, match="temperature must be a positive"):
        DistillSettings(temperature=0.0)
    with pytest.raises(InputError, match=r"alpha must be in \[0, 1\]"):
        DistillSettings(alpha=1.5)
    with pytest.raises(InputError, match="attention_weight must be >= 0"):
        DistillSettings(attention_weight=-1.0)


def _teacher_dir(tmp_path):
    teacher = _model("gpt2", 0, max_seq_len=64)
    return save_pretrained(teacher, tmp_path / "teacher", tokenizer=ByteTokenizer())


def _corpus(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("\n".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(300)))
    return data


def test_cli_distills_a_loadable_student(tmp_path, capsys):
    teacher_dir, data = _teacher_dir(tmp_path), _corpus(tmp_path)
    student_cfg = tmp_path / "student.yaml"
    student_cfg.write_text("preset: gpt2\nn_layers: 1\nd_model: 16\nn_heads: 2\nd_ff: 32\nmax_seq_len: 64\n")
    out = tmp_path / "student"
    code = main(["distill", "--teacher", str(teacher_dir), "--student", str(student_cfg), "--data", str(data),
                 "--steps", "3", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "2",
                 "--attention-weight", "1", "--out", str(out), "--log-every", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "step 3/3" in printed and "attention" in printed
    narrow = tmp_path / "narrow.yaml"
    narrow.write_text("preset: gpt2\nn_layers: 1\nd_model: 32\nn_heads: 4\nd_ff: 32\nmax_seq_len: 64\n")
    assert main(["distill", "--teacher", str(teacher_dir), "--student", str(narrow), "--data", str(data),
                 "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--init-from-teacher",
                 "--out", str(tmp_path / "narrow"), "--log-every", "0"]) == 0
    assert "teacher's layers 1" in capsys.readouterr().out
    student = from_pretrained(out)
    assert student.config.n_layers == 1 and student.config.vocab_size == VOCAB
    summary = json.loads((out / "distill.json").read_text())
    assert summary["steps"] == 3 and summary["student_parameters"] == student.num_parameters()
    assert math.isfinite(summary["student"]["loss"]) and summary["teacher"]["loss"] > 0


@pytest.mark.parametrize(("teacher", "data"), [
    (("bert-base", {"max_seq_len": 64}), "corpus"),
    (("bert-base", {"max_seq_len": 64, "head": "classifier", "num_labels": 4, "pooling": "cls"}), "synthetic:topics"),
])
def test_cli_distills_masked_lm_and_classifier_students(tmp_path, teacher, data):
    preset, fields = teacher
    teacher_dir = save_pretrained(_model(preset, 0, **fields), tmp_path / "teacher", tokenizer=ByteTokenizer())
    source = str(_corpus(tmp_path)) if data == "corpus" else data
    student_cfg = tmp_path / "student.json"
    student_cfg.write_text(json.dumps({"preset": preset, "n_layers": 1, "d_model": 16, "n_heads": 4, "d_ff": 32,
                                       "max_seq_len": 64}))
    out = tmp_path / "student"
    code = main(["distill", "--teacher", str(teacher_dir), "--student", str(student_cfg), "--data", source,
                 "--steps", "2", "--batch-size", "4", "--seq-len", "32", "--eval-batches", "1",
                 "--attention-weight", "1", "--out", str(out), "--log-every", "0"])
    assert code == 0
    student, original = from_pretrained(out), from_pretrained(teacher_dir)
    assert (student.config.head, student.config.num_labels) == (original.config.head, original.config.num_labels)
    assert student.config.d_model == 16
    summary = json.loads((out / "distill.json").read_text())
    assert set(summary["student"]) >= {"loss", "accuracy"}


@pytest.mark.parametrize(("student_text", "extra", "message"), [
    ("preset: gpt2\nn_layers: 1\nd_model: 16\nn_heads: 2\nvocab_size: 300\n", [], "vocab_size is 259"),
    ("preset: gpt2\nn_layers: 1\nd_model: 16\nn_heads: 2\n", ["--temperature", "0"], "temperature must be"),
    ("preset: gpt2\nn_layers: 1\nd_model: 16\nn_heads: 2\n", ["--alpha", "-0.1"], "alpha must be in"),
])
def test_cli_bad_input_exits_2_with_a_clear_message(tmp_path, capsys, student_text, extra, message):
    teacher_dir, data = _teacher_dir(tmp_path), _corpus(tmp_path)
    student_cfg = tmp_path / "student.yaml"
    student_cfg.write_text(student_text)
    code = main(["distill", "--teacher", str(teacher_dir), "--student", str(student_cfg), "--data", str(data),
                 "--steps", "1", "--out", str(tmp_path / "out"), *extra])
    assert code == 2
    assert message in capsys.readouterr().err


def test_student_from_teacher_layers_and_most_important_neurons():
    teacher = _model("llama", 0, n_layers=4, d_ff=64, n_kv_heads=2)
    assert spaced_layers(4, 2) == [1, 3] and spaced_layers(6, 3) == [1, 3, 5] and spaced_layers(3, 3) == [0, 1, 2]
    deep = _model("llama", 1, n_layers=4, d_ff=48, n_kv_heads=2)
    assert init_from_teacher(deep, teacher) == [0, 1, 2, 3]
    # the student = the teacher with the dropped neurons of every layer silenced (brute force: zero them by hook)
    dropped = {}
    for i in range(4):
        mlp = teacher.blocks[i].mlp
        score = [(mlp.fc_in.weight[j].norm() * mlp.fc_gate.weight[j].norm() * mlp.fc_out.weight[:, j].norm()).item()
                 for j in range(64)]
        dropped[i] = sorted(range(64), key=lambda j: score[j])[:16]

    def silence(post, hook):
        post[..., dropped[int(hook.name.split(".")[1])]] = 0.0
        return post

    x = _batch("causal")["x"]
    with torch.no_grad():
        reference = run_with_hooks(teacher, x, fwd_hooks=[(lambda n: n.endswith("mlp.hook_post"), silence)])
        assert torch.allclose(deep(x).logits, reference, atol=1e-5)
    shallow = _model("llama", 2, n_layers=2, d_ff=64, n_kv_heads=2)
    init_from_teacher(shallow, teacher)
    assert torch.equal(shallow.blocks[0].attn.qkv.weight, teacher.blocks[1].attn.qkv.weight)
    assert torch.equal(shallow.blocks[1].mlp.fc_out.weight, teacher.blocks[3].mlp.fc_out.weight)
    with pytest.raises(ConfigError, match="differ in n_layers and d_ff only"):
        init_from_teacher(_model("llama", 3, n_layers=2, d_model=16, n_heads=2, n_kv_heads=2), teacher)
