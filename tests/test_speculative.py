"""Speculative decoding: greedy output equals the target's own greedy output; samples follow the target."""

from __future__ import annotations

import copy

import pytest
import torch
from scipy.stats import chi2

import formerkit as fk
from formerkit.generate.config import GenerationConfig
from formerkit.generate.processors import process
from formerkit.generate.speculative import speculative_generate

SMALL = dict(n_layers=2, d_model=32, n_heads=4, d_ff=48, vocab_size=64, max_seq_len=64, init_std=0.1,
             tie_embeddings=False)

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(preset: str = "gpt2", seed: int = 0, **kw) -> fk.Transformer:
    torch.manual_seed(seed)
    if preset == "llama":
        kw.setdefault("n_kv_heads", 2)
    return fk.Transformer(fk.ModelConfig.from_preset(preset, **{**SMALL, **kw})).eval()


def _perturbed(model: fk.Transformer, noise: float, seed: int = 5) -> fk.Transformer:
    """A copy of ``model`` with Gaussian noise added to every weight (a draft that agrees often, not always)."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * noise)
    return other


@torch.no_grad()
def _greedy(model: fk.Transformer, ids: torch.Tensor, max_new_tokens: int, eos: int | None = None) -> torch.Tensor:
    """Plain greedy decoding: full recomputation, no cache; stops at EOS (kept) or max_seq_len."""
    for _ in range(max_new_tokens):
        if ids.shape[1] >= model.config.max_seq_len:
            break
        token = model(ids).logits[0, -1].argmax()
        ids = torch.cat([ids, token.view(1, 1)], dim=1)
        if token.item() == eos:
            break
    return ids


PROMPT = torch.tensor([[3, 17, 42, 5, 9]])
TARGET = _model("gpt2", 0)
LLAMA = _model("llama", 1)
PAIRS = {
    "self": (TARGET, TARGET),
    "perturbed": (TARGET, _perturbed(TARGET, 0.005)),
    "perturbed-more": (TARGET, _perturbed(TARGET, 0.02)),
    "random-gpt2": (TARGET, _model("gpt2", 7, n_layers=1)),
    "random-llama": (TARGET, _model("llama", 8, n_layers=1, n_kv_heads=1)),
    "llama-gqa": (LLAMA, _perturbed(LLAMA, 0.005)),
    "llama-self": (LLAMA, LLAMA),
}


@pytest.mark.parametrize("name", sorted(PAIRS))
@pytest.mark.parametrize("k", [1, 3])
def test_greedy_equals_target_greedy(name, k):
    target, draft = PAIRS[name]
    out = speculative_generate(target, draft, PROMPT, max_new_tokens=20, num_draft_tokens=k)
    assert torch.equal(out.sequences, _greedy(target, PROMPT, 20))
    assert torch.equal(out.sequences, fk.generate(target, PROMPT, max_new_tokens=20))
    assert 0.0 <= out.acceptance_rate <= 1.0
    assert out.num_accepted <= out.num_proposed
    assert out.target_calls <= 20
    if draft is target:
        assert out.acceptance_rate == 1.0
        assert out.target_calls == -(-20 // (k + 1))  # every round adds k + 1 tokens


def test_acceptance_tracks_draft_quality():
    good = speculative_generate(*PAIRS["perturbed"], PROMPT, max_new_tokens=20).acceptance_rate
    worse = speculative_generate(*PAIRS["perturbed-more"], PROMPT, max_new_tokens=20).acceptance_rate
    bad = speculative_generate(*PAIRS["random-gpt2"], PROMPT, max_new_tokens=20).acceptance_rate
    assert bad < 0.1 < worse < good


def test_greedy_stops_at_eos():
    target, draft = PAIRS["perturbed"]
    reference = _greedy(target, PROMPT, 20)
    eos = int(reference[0, PROMPT.shape[1] + 6])
    out = speculative_generate(target, draft, PROMPT, max_new_tokens=20, num_draft_tokens=4, eos_token_id=[63, eos])
    assert torch.equal(out.sequences, _greedy(target, PROMPT, 20, eos=eos))
    assert out.sequences[0, -1] == eos


def test_fills_max_seq_len_exactly_and_restores_training_mode():
    target, draft = PAIRS["perturbed"]
    n = SMALL["max_seq_len"] - PROMPT.shape[1]
    draft.train()
    out = speculative_generate(target, draft, PROMPT.tolist(), max_new_tokens=n, num_draft_tokens=4)
    still_training = draft.training
    draft.eval()
    assert still_training and not target.training
    assert out.sequences.shape[1] == SMALL["max_seq_len"]
    assert torch.equal(out.sequences, _greedy(target, PROMPT, n))


def test_zero_new_tokens_returns_prompt():
    out = speculative_generate(TARGET, TARGET, PROMPT, max_new_tokens=0)
    assert torch.equal(out.sequences, PROMPT) and out.target_calls == 0 and out.acceptance_rate == 0.0


VOCAB, NEW, RUNS = 8, 3, 2000
STAT_PROMPT = torch.tensor([[1, 4, 2]])
STAT_TARGET = _model("gpt2", 11, vocab_size=VOCAB, n_layers=1, init_std=0.5, max_seq_len=8)
STAT_DRAFTS = {"unrelated": _model("llama", 12, vocab_size=VOCAB, n_layers=1, init_std=0.5, max_seq_len=8),
               "close": _perturbed(STAT_TARGET, 0.1)}  # accepts ~80% of proposals: exercises the bonus token


@torch.no_grad()
def _exact_joint(model: fk.Transformer, cfg: GenerationConfig) -> torch.Tensor:
    """The target's distribution (V ** NEW,) of the next NEW tokens after STAT_PROMPT, by enumeration."""
    joint = torch.ones(1)  # (V ** t,) probabilities of every continuation of length t, in lexicographic order
    for t in range(NEW):
        tails = torch.cartesian_prod(*[torch.arange(VOCAB)] * t).view(-1, t) if t else torch.empty(1, 0)
        ids = torch.cat([STAT_PROMPT.expand(len(tails), -1), tails.long()], dim=1)  # (V ** t, T + t)
        probs = process(model(ids).logits[:, -1], cfg).softmax(-1)  # (V ** t, V)
        joint = (joint[:, None] * probs).flatten()
    return joint


def _chi_square_pvalue(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson chi-square p-value of counts (C,) against probabilities (C,); cells expecting < 5 are pooled."""
    expected = expected_probs.double() * counts.sum()
    big = expected >= 5
    observed = torch.cat([counts[big].double(), counts[~big].sum().double().view(1)])
    expected = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = expected > 0
    stat = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    return float(chi2.sf(stat, int(keep.sum()) - 1))


def _empirical(draft: fk.Transformer, **sampling) -> tuple[torch.Tensor, float]:
    counts = torch.zeros(VOCAB**NEW)
    rates = []
    for seed in range(RUNS):
        out = speculative_generate(STAT_TARGET, draft, STAT_PROMPT, max_new_tokens=NEW, num_draft_tokens=2,
                                   seed=seed, **sampling)
        a, b, c = out.sequences[0, -NEW:].tolist()
        counts[(a * VOCAB + b) * VOCAB + c] += 1
        rates.append(out.acceptance_rate)
    return counts, sum(rates) / len(rates)


@pytest.mark.parametrize("draft, sampling", [
    ("unrelated", dict(temperature=1.0)),
    ("close", dict(temperature=1.0)),
    ("close", dict(temperature=0.8, top_k=5, top_p=0.95)),
])
def test_samples_follow_target_distribution(draft, sampling):
    """Over RUNS seeds, the triples generated match the target's exact distribution (chi-square, TV).

    Checked to fail when the acceptance rule is broken: always accepting the draft (p ~ 0),
    drawing the replacement from p instead of max(0, p - q) (p < 1e-25), or drawing the bonus
    token from the wrong row (p < 1e-30 with the close draft, which reaches the bonus often).
    """
    exact = _exact_joint(STAT_TARGET, GenerationConfig(**sampling))
    draft_dist = _exact_joint(STAT_DRAFTS[draft], GenerationConfig(**sampling))
    assert 0.5 * (exact - draft_dist).abs().sum() > 0.5  # the draft alone would be far off
    counts, mean_rate = _empirical(STAT_DRAFTS[draft], **sampling)
    assert _chi_square_pvalue(counts, exact) > 1e-3
    assert _chi_square_pvalue(counts, draft_dist) < 1e-12
    assert 0.5 * (counts / RUNS - exact).abs().sum() < 0.1
    assert 0.0 < mean_rate < 1.0


def test_sampling_reproducible_and_self_draft_accepts_everything():
    kw = dict(max_new_tokens=12, num_draft_tokens=3, temperature=1.0)
    first = speculative_generate(TARGET, PAIRS["perturbed"][1], PROMPT, seed=3, **kw)
    again = speculative_generate(TARGET, PAIRS["perturbed"][1], PROMPT, seed=3, **kw)
    assert torch.equal(first.sequences, again.sequences)
    assert speculative_generate(TARGET, TARGET, PROMPT, seed=3, **kw).acceptance_rate == 1.0


@pytest.mark.parametrize("case, message", [
    (dict(input_ids=PROMPT.expand(2, -1)), "batch size 1"),
    (dict(draft=_model("gpt2", 2, vocab_size=65)), "vocab sizes differ"),
    (dict(draft=_model("bert-base", 2, head="mlm")), "decoder-only"),
    (dict(num_draft_tokens=0), "num_draft_tokens"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(input_ids=PROMPT[0]), "batch"),
    (dict(input_ids=torch.zeros(1, 60, dtype=torch.long)), "max_seq_len"),
    (dict(draft=_model("gpt2", 2, max_seq_len=16), max_new_tokens=20), "max_seq_len=16"),
    (dict(seed="x"), "seed"),
])
def test_bad_input(case, message):
    args = dict(target=TARGET, draft=TARGET, input_ids=PROMPT)
    kwargs = {k: case.pop(k) for k in list(case) if k not in args}
    args.update(case)
    with pytest.raises(fk.InputError, match=message):
        speculative_generate(args["target"], args["draft"], args["input_ids"], **kwargs)
