"""Sequence-to-sequence training: parallel data, the synthetic task, the loss, the schedule, metrics, end to end."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import sacrebleu
import torch
import torch.nn.functional as F

import formerkit as fk
from formerkit.data.pairs import ParallelData, load_pairs
from formerkit.data.synthetic import MAX_NUMBER, number_to_words, synthetic_pairs
from formerkit.errors import ConfigError, DataError
from formerkit.train import TrainConfig, train
from formerkit.train.config import options_help
from formerkit.train.logging import read_metrics
from formerkit.train.optim import inverse_sqrt_lr, lr_at
from formerkit.train.seq2seq import label_smoothed_loss, teacher_forcing
from formerkit.train.seq2seq_eval import exact_match, translation_metrics


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---- parallel data -------------------------------------------------------------------------------


def test_tsv_pairs_skip_blank_lines_and_keep_inner_spaces(tmp_path):
    data = load_pairs(write(tmp_path / "p.tsv", "one two\teins zwei\n\n  \nthree\tdrei\n"))
    assert data == ParallelData(["one two", "three"], ["eins zwei", "drei"])
    assert data.texts() == ["one two", "three", "eins zwei", "drei"]


@pytest.mark.parametrize("content, fragment", [
    ("a\tb\nno tab here\n", "line 2: expected one source<TAB>target pair, found no tab"),
    ("a\tb\nc\td\te\n", "line 2: expected one source<TAB>target pair, found 2 tabs"),
    ("a\tb\n\n\tx\n", "line 3: the source side is empty"),
    ("a\t  \n", "line 1: the target side is empty"),
])
def test_tsv_errors_name_file_and_line(tmp_path, content, fragment):
    path = write(tmp_path / "bad.tsv", content)
    with pytest.raises(DataError, match=fragment) as info:
        load_pairs(path)
    assert str(path) in str(info.value)


def test_jsonl_pairs_with_configured_keys(tmp_path):
    lines = [{"en": "cat", "de": "Katze", "id": 1}, {"en": "dog", "de": "Hund"}]
    path = write(tmp_path / "p.jsonl", "\n".join(json.dumps(r) for r in lines) + "\n")
    assert load_pairs(path, source_field="en", target_field="de") == ParallelData(["cat", "dog"], ["Katze", "Hund"])
    with pytest.raises(DataError, match=r'line 1: no "source" key \(keys here: de, en, id\).*--data.source_field'):
        load_pairs(path)


@pytest.mark.parametrize("record, fragment", [
    ({"source": "a"}, 'line 2: no "target" key'),
    ({"source": "a", "target": ""}, 'line 2: "target" \\(the target\\) is empty'),
    ({"source": 3, "target": "b"}, 'line 2: "source" must be a string, got int'),
])
def test_jsonl_errors_name_the_line(tmp_path, record, fragment):
    path = write(tmp_path / "bad.jsonl", json.dumps({"source": "x", "target": "y"}) + "\n" + json.dumps(record))
    with pytest.raises(DataError, match=fragment):
        load_pairs(path)


@pytest.mark.parametrize("name", ["empty.tsv", "empty.jsonl"])
def test_empty_or_missing_files_are_data_errors(tmp_path, name):
    with pytest.raises(DataError, match="holds no pairs"):
        load_pairs(write(tmp_path / name, "\n\n"))
    with pytest.raises(DataError, match="does not exist"):
        load_pairs(tmp_path / "missing.tsv")


def test_split_is_deterministic_disjoint_and_complete():
    data = ParallelData([f"s{i}" for i in range(50)], [f"t{i}" for i in range(50)])
    train_a, val_a = data.split(0.2, seed=3)
    train_b, val_b = data.split(0.2, seed=3)
    assert (train_a, val_a) == (train_b, val_b) and len(val_a) == 10
    assert sorted(train_a.sources + val_a.sources) == sorted(data.sources)
    assert all(t == "t" + s[1:] for s, t in zip(train_a.sources, train_a.targets, strict=True))  # still aligned


# ---- the synthetic task ----------------------------------------------------------------------------


@pytest.mark.parametrize("n, words", [
    (0, "zero"), (7, "seven"), (13, "thirteen"), (20, "twenty"), (42, "forty-two"), (100, "one hundred"),
    (412, "four hundred twelve"), (1000, "one thousand"), (70010, "seventy thousand ten"),
    (412005, "four hundred twelve thousand five"),
    (MAX_NUMBER, "nine hundred ninety-nine thousand nine hundred ninety-nine"),
])
def test_number_words(n, words):
    assert number_to_words(n) == words


def test_number_words_are_distinct_for_every_number():
    assert len({number_to_words(n) for n in range(0, MAX_NUMBER + 1, 7)}) == MAX_NUMBER // 7 + 1


def test_synthetic_task_is_deterministic_with_disjoint_splits():
    train_a, test_a = synthetic_pairs("synthetic:digits-to-words", size=3000, val_fraction=0.1, seed=0)
    train_b, test_b = synthetic_pairs("synthetic:digits-to-words", size=3000, val_fraction=0.1, seed=0)
    assert (train_a, test_a) == (train_b, test_b)
    assert (len(train_a), len(test_a)) == (2700, 300)
    assert not set(train_a.sources) & set(test_a.sources)
    assert len(set(train_a.sources)) == 2700
    assert all(number_to_words(int(s)) == t for s, t in zip(train_a.sources, train_a.targets, strict=True))
    assert {len(s) for s in train_a.sources} == {1, 2, 3, 4, 5, 6}  # every digit count occurs
    other_seed = synthetic_pairs("synthetic:digits-to-words", size=3000, val_fraction=0.1, seed=1)[1]
    assert other_seed.sources != test_a.sources


def test_reverse_task_swaps_the_sides():
    train_pairs, test_pairs = synthetic_pairs("synthetic:words-to-digits", size=500, val_fraction=0.1, seed=0)
    for part in (train_pairs, test_pairs):
        assert all(number_to_words(int(t)) == s and str(int(t)) == t
                   for s, t in zip(part.sources, part.targets, strict=True))
    assert not set(train_pairs.targets) & set(test_pairs.targets)


def test_unknown_synthetic_task_suggests_a_name():
    with pytest.raises(ConfigError, match='did you mean "digits-to-words"'):
        synthetic_pairs("synthetic:digit-to-words", size=10, val_fraction=0.1, seed=0)


def test_load_parallel_reads_synthetic_tasks_and_files(tmp_path):
    from formerkit.train.seq2seq import load_parallel

    options = dict(source_field="source", target_field="target", synthetic_size=200, val_fraction=0.1, seed=0)
    train_pairs, held_out = load_parallel("synthetic:words-to-digits", **options)
    assert (len(train_pairs), len(held_out)) == (180, 20)
    train_pairs, held_out = load_parallel(str(write(tmp_path / "p.tsv", "a\tb\nc\td\ne\tf\n")), **options)
    assert (len(train_pairs), len(held_out)) == (2, 1)
    with pytest.raises(DataError, match="at least 2"):
        load_parallel(str(write(tmp_path / "one.tsv", "a\tb\n")), **options)
    with pytest.raises(ConfigError, match="needs --data.source"):
        load_parallel(None, **options)


# ---- batches and the loss ----------------------------------------------------------------------------


def test_teacher_forcing_shifts_and_pads():
    inputs, labels = teacher_forcing([[5, 6, 7], [8]], start_id=0, eos_id=1, pad_id=0)
    assert inputs.tolist() == [[0, 5, 6, 7], [0, 8, 0, 0]]
    assert labels.tolist() == [[5, 6, 7, 1], [8, 1, -100, -100]]


def _brute_force_smoothed(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> float:
    V = logits.shape[-1]
    total, count = 0.0, 0
    for row_logits, row_labels in zip(logits.double(), labels, strict=True):
        for position_logits, label in zip(row_logits, row_labels.tolist(), strict=True):
            if label == -100:
                continue
            log_p = position_logits - torch.logsumexp(position_logits, 0)
            target = torch.full((V,), eps / V, dtype=torch.float64)
            target[label] += 1 - eps
            total += float(-(target * log_p).sum())
            count += 1
    return total / count


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothed_loss_equals_brute_force_and_torch(eps):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 3  # (B, T, V)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    labels[0, 3:] = -100  # padding
    labels[2, 1:] = -100
    ours = label_smoothed_loss(logits, labels, eps)
    assert float(ours) == pytest.approx(_brute_force_smoothed(logits, labels, eps), abs=1e-5)
    reference = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, label_smoothing=eps)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_label_smoothed_loss_ignores_padding_values():
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[1, 2, -100, -100], [3, -100, -100, -100]])
    changed = logits.clone()
    changed[0, 2:] += 50.0  # only padded positions change
    changed[1, 1:] -= 50.0
    assert float(label_smoothed_loss(logits, labels, 0.1)) == pytest.approx(float(label_smoothed_loss(changed, labels,
                                                                                                        0.1)))


# ---- the schedule --------------------------------------------------------------------------------------


def test_inverse_sqrt_schedule_matches_its_closed_form_and_the_papers():
    cfg = TrainConfig.load(None, ["--optim.schedule", "inverse_sqrt", "--optim.lr", "0.002",
                                  "--optim.warmup_steps", "400"]).optim
    for step in [0, 1, 99, 398, 399, 400, 1000, 99_999]:
        s = step + 1
        expected = 0.002 * min(s / 400, math.sqrt(400 / s))
        assert lr_at(step, cfg, total_steps=10) == pytest.approx(expected, rel=1e-12)  # total steps play no part
    assert max(lr_at(step, cfg, 10) for step in range(2000)) == pytest.approx(0.002)
    assert lr_at(399, cfg, 10) == pytest.approx(0.002)
    d_model, warmup = 512, 4000
    for s in [1, 100, 4000, 4001, 50_000]:  # Vaswani et al. (3): d_model^-0.5 * min(s^-0.5, s * warmup^-1.5)
        paper = d_model**-0.5 * min(s**-0.5, s * warmup**-1.5)
        assert inverse_sqrt_lr(s - 1, (d_model * warmup) ** -0.5, warmup) == pytest.approx(paper, rel=1e-12)


def test_schedule_options_are_checked():
    with pytest.raises(ConfigError, match="needs optim.warmup_steps >= 1"):
        TrainConfig.load(None, ["--optim.schedule", "inverse_sqrt", "--optim.warmup_steps", "0"])
    with pytest.raises(ConfigError, match='did you mean "inverse_sqrt"'):
        TrainConfig.load(None, ["--optim.schedule", "inverse-sqrt"])
    with pytest.raises(ConfigError, match="label_smoothing"):
        TrainConfig.load(None, ["--train.label_smoothing", "1.0"])
    assert TrainConfig.load(None, []).optim.schedule == "cosine"


# ---- metrics -------------------------------------------------------------------------------------------


def test_exact_match_and_sacrebleu_plumbing():
    hyps = ["four hundred twelve", "the cat sat on the mat ", "seven"]
    refs = ["four hundred twelve", "the cat sat on the mat", "seventy"]
    assert exact_match(hyps, refs) == pytest.approx(2 / 3)
    metrics = translation_metrics(hyps, refs)
    assert metrics["exact_match"] == pytest.approx(2 / 3)
    assert metrics["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert metrics["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert 0 < metrics["bleu"] < 100 and 0 < metrics["chrf"] < 100
    perfect = translation_metrics(refs, refs)
    assert perfect == {"bleu": pytest.approx(100.0), "chrf": pytest.approx(100.0), "exact_match": 1.0}
    with pytest.raises(fk.InputError, match="one hypothesis per reference"):
        translation_metrics(["a"], ["a", "b"])


def test_every_new_option_is_in_train_help():
    text = options_help()
    for option in ["--data.source_field", "--data.target_field", "--data.synthetic_size", "--train.label_smoothing",
                   "--optim.schedule", "--eval.translate_pairs", "--eval.num_beams", "--eval.max_new_tokens"]:
        assert option in text
    assert "seq2seq" in text and "inverse_sqrt" in text and "synthetic:digits-to-words" in text


# ---- training end to end ----------------------------------------------------------------------------------


TINY = ["--model.preset", "vaswani-base", "--model.d_model", "48", "--model.n_heads", "4", "--model.d_ff", "96",
        "--model.n_layers", "2", "--model.n_decoder_layers", "2", "--model.resid_dropout", "0",
        "--model.embed_dropout", "0"]


def reversal_pairs(tmp_path: Path) -> Path:
    """A TSV of every 3-letter string over "abcd" and its reversal (64 pairs)."""
    lines = ["".join(w) + "\t" + "".join(reversed(w)) for w in itertools.product("abcd", repeat=3)]
    return write(tmp_path / "reverse.tsv", "\n".join(lines) + "\n")


def seq2seq_config(tmp_path: Path, *extra: str) -> TrainConfig:
    return TrainConfig.load(None, [
        *TINY, "--train.objective", "seq2seq", "--data.source", str(reversal_pairs(tmp_path)),
        "--data.tokenizer", "char", "--data.val_fraction", "0.25", "--train.steps", "120", "--train.batch_size", "32",
        "--train.seq_len", "16", "--train.precision", "fp32", "--optim.schedule", "inverse_sqrt", "--optim.lr", "0.003",
        "--optim.warmup_steps", "20", "--optim.weight_decay", "0", "--eval.every", "60", "--eval.num_beams", "2",
        "--eval.max_new_tokens", "6", "--checkpoint.every", "120", "--checkpoint.run_dir", str(tmp_path / "run"),
        "--log.every", "10", "--log.progress", "false", "--log.tensorboard", "false", "--log.samples", "2", *extra])


@pytest.mark.slow
def test_tiny_encoder_decoder_learns_to_reverse_and_translates_afterwards(tmp_path, capsys):
    from formerkit.cli import main

    result = train(seq2seq_config(tmp_path))
    val = result.val
    assert val["exact_match"] >= 0.5  # chance: 1/64 for a right guess of all three letters
    assert val["chrf"] > 50 and 0 <= val["bleu"] <= 100
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "val"]
    assert [r["step"] for r in records] == [60, 120]
    assert {"loss", "perplexity", "bleu", "chrf", "exact_match"} <= set(records[-1])
    assert len(result.samples) == 2 and "\n  -> " in result.samples[0]
    model = fk.from_pretrained(tmp_path / "run")
    tok = fk.load_tokenizer(tmp_path / "run")
    assert model.config.kind == "encoder-decoder" and model.config.decoder_start_token_id == tok.pad_id
    assert model.lm_head.proj.weight is model.tok_embed.weight  # one table for source, target and output
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "abc", "--prompt", "dab",
                 "--max-new-tokens", "6"]) == 0
    greedy = capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "abc", "--num-beams", "3",
                 "--max-new-tokens", "6"]) == 0
    beam = capsys.readouterr().out.strip()
    assert greedy.startswith("--- 1 ---\n") and len(beam) == 3


def test_seq2seq_run_reports_bad_data_and_missing_source(tmp_path):
    bad = write(tmp_path / "bad.tsv", "a\tb\nc d\n")
    with pytest.raises(DataError, match=r"bad.tsv, line 2: .*no tab"):
        train(seq2seq_config(tmp_path, "--data.source", str(bad)))
    with pytest.raises(ConfigError, match="needs --data.source"):
        train(seq2seq_config(tmp_path, "--data.source", "", "--checkpoint.run_dir", str(tmp_path / "run2")))
    with pytest.raises(ConfigError, match="needs model.kind=encoder-decoder"):
        train(seq2seq_config(tmp_path, "--model.kind", "decoder", "--checkpoint.run_dir", str(tmp_path / "run3")))


@pytest.mark.parametrize("kind", ["decoder", "encoder-decoder"])
def test_beam_texts_with_one_beam_is_greedy_text(kind):
    from formerkit.generate.translate import beam_texts
    from formerkit.tokenizers import ByteTokenizer

    torch.manual_seed(0)
    preset = "gpt2" if kind == "decoder" else "vaswani-base"
    model = fk.Transformer(fk.ModelConfig.from_preset(preset, vocab_size=259, d_model=32, n_heads=4, d_ff=64,
                                                      n_layers=2, init_std=0.5)).eval()
    tok = ByteTokenizer()
    prompts = ["ab", "hello there", "x"]
    greedy = fk.generate_text(model, tok, prompts, max_new_tokens=6)
    assert beam_texts(model, tok, prompts, num_beams=1, max_new_tokens=6, batch_size=2) == greedy
    assert len(beam_texts(model, tok, prompts, num_beams=3, max_new_tokens=6)) == 3
    with pytest.raises(fk.InputError, match="non-empty list"):
        beam_texts(model, tok, "ab")
