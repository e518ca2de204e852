"""Beam search: parity with transformers' generate(num_beams=...), greedy, a brute-force search, bad inputs.

The reference models are tiny GPT-2 and Llama (GQA) re-initialised with ``reinit_for_parity``
(std 0.3), so next-token distributions are peaked and no near-ties make the two implementations diverge.
End-of-sequence ids are tokens the model actually produces, so hypotheses finish early.
"""

from __future__ import annotations

import os

import pytest
import torch

import formerkit as fk
from conftest import reinit_for_parity, require
from formerkit.generate.beam import BeamOutput, beam_search

VOCAB, PAD, NEW = 96, 1, 10
SMALL = dict(n_layers=2, d_model=32, n_heads=4, d_ff=48, vocab_size=64, max_seq_len=32)


def _left_padded_prompts(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 5 and 8 tokens, the first left-padded with PAD: ids and mask (2, 8)."""
    ids = torch.randint(3, vocab, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = PAD, 0
    return ids, mask


def _greedy(model: fk.Transformer, ids: torch.Tensor, mask: torch.Tensor, steps: int, eos: int | None = None):
    """Argmax decoding by full recomputation (no cache); return (ids + new tokens, summed log-probs (B,), lengths)."""
    ids, mask = ids.clone(), mask.clone()
    total, length = torch.zeros(ids.shape[0]), torch.zeros(ids.shape[0], dtype=torch.long)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for _ in range(steps):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            log_probs = model(ids, mask, position_ids=positions).logits[:, -1].float().log_softmax(-1)  # (B, V)
            token = log_probs.argmax(-1)  # (B,)
            total += torch.where(finished, 0.0, log_probs.max(-1).values)
            length += (~finished).long()
            ids = torch.cat([ids, torch.where(finished, PAD, token)[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            finished |= token == eos
            if finished.all():
                break
    return ids, total, length


# ---------------------------------------------------------------- parity with transformers


@pytest.fixture(scope="module", params=["gpt2", "llama-gqa"])
def reference(request, tmp_path_factory):
    """(transformers model, the same weights loaded by formerkit)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = require("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if request.param == "gpt2":
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=2, eos_token_id=2))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=2, eos_token_id=2, pad_token_id=PAD))
    directory = tmp_path_factory.mktemp(request.param)
    # seed 3: under seeds 0-2, no token Llama produces greedily ends a returned hypothesis early as an EOS at
    # length_penalty 2.0, which test_equals_transformers_generate needs (its precondition, not a parity failure)
    reinit_for_parity(hf, seed=3).eval().save_pretrained(directory)
    return hf, fk.from_pretrained(directory)


def _finishes_early(sequences: torch.Tensor, prompt_len: int, eos: list[int]) -> bool:
    """True when some sequence holds an EOS before its last possible position (it ended before max_new_tokens)."""
    return bool(torch.isin(sequences[:, prompt_len:prompt_len + NEW - 1], torch.tensor(eos)).any())


def _generate(hf, ids: torch.Tensor, mask: torch.Tensor, eos: list[int], kw: dict):
    """transformers' beam search (greedy search for num_beams=1) with scores."""
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=eos, output_scores=True,
                           return_dict_in_generate=True, **kw)


@pytest.mark.parametrize("num_beams, length_penalty, early_stopping, n_return, eos_choice", [
    (3, 1.0, True, 1, "liked"),
    (4, 0.5, False, 2, "liked"),
    (2, 1.0, False, 2, "three"),
    (3, 1.0, False, 2, "three"),
    (4, 2.0, True, 2, "liked"),
    (3, 0.5, "never", 2, "liked"),
    (2, 2.0, "never", 2, "three"),
    (1, 1.0, True, 1, "liked"),
])
def test_equals_transformers_generate(reference, num_beams, length_penalty, early_stopping, n_return, eos_choice):
    hf, model = reference
    ids, mask = _left_padded_prompts(VOCAB)
    kw = dict(num_beams=num_beams, max_new_tokens=NEW, length_penalty=length_penalty, early_stopping=early_stopping,
              num_return_sequences=n_return, pad_token_id=PAD)
    if eos_choice == "three":
        # The 2nd to 4th likeliest first tokens of prompt 0 are EOS ids: the 2nd-ranked candidate of the
        # first step always finishes (num_beams >= 2), and as each step keeps (1 + 3) * num_beams
        # candidates, num_beams beams still run on when most of them end.
        with torch.no_grad():
            first = model(ids, mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[0, -1]
        eos = first.topk(4).indices[1:].tolist()
        ref = _generate(hf, ids, mask, eos, kw)
    else:  # one token the model produces greedily: the first that ends a returned hypothesis early
        liked = _greedy(model, ids, mask, 4)[0][:, 8:].T.flatten().tolist()
        for eos in [[t] for t in dict.fromkeys(liked) if t != PAD]:
            ref = _generate(hf, ids, mask, eos, kw)
            if _finishes_early(ref.sequences, 8, eos):
                break
        else:
            pytest.fail(f"no token of {liked} as EOS ends a returned hypothesis before max_new_tokens")
    out = beam_search(model, ids, attention_mask=mask, eos_token_id=eos, **kw)
    assert isinstance(out, BeamOutput)
    assert out.sequences.dtype == torch.long and out.scores.shape == (2 * n_return,)
    assert torch.equal(out.sequences, ref.sequences)
    if num_beams == 1:
        # transformers routes num_beams=1 to greedy search, which reports no sequences_scores;
        # test_one_beam_is_greedy checks our scores for this case.
        assert getattr(ref, "sequences_scores", None) is None
    else:
        assert (out.scores - ref.sequences_scores).abs().max() < 1e-4


# ---------------------------------------------------------------- greedy


def _peaked_llama() -> fk.Transformer:
    """A tiny formerkit Llama with a large init range (peaked next-token distributions)."""
    torch.manual_seed(0)
    return fk.Transformer(fk.ModelConfig.from_preset("llama", **{**SMALL, "init_std": 0.3})).eval()


def test_one_beam_is_greedy():
    model = _peaked_llama()
    ids, mask = _left_padded_prompts(64)
    eos = int(_greedy(model, ids, mask, 3)[0][0, -1])  # row 0 ends after three tokens; row 1 may run on
    expected, total, length = _greedy(model, ids, mask, NEW, eos)
    out = beam_search(model, ids, attention_mask=mask, num_beams=1, max_new_tokens=NEW, length_penalty=1.5,
                      eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(out.sequences, expected)
    assert length[0] == 3
    assert torch.allclose(out.scores, total / length.float() ** 1.5, atol=1e-5)


def test_rows_do_not_depend_on_batching_or_padding():
    model = _peaked_llama()
    ids, mask = _left_padded_prompts(64)
    eos = int(_greedy(model, ids, mask, 3)[0][0, -1])
    kw = dict(num_beams=3, max_new_tokens=NEW, length_penalty=0.0, early_stopping=False, num_return_sequences=2,
              eos_token_id=eos, pad_token_id=PAD)
    batch = beam_search(model, ids, attention_mask=mask, **kw)
    for row, prompt in enumerate([ids[0, 3:], ids[1]]):
        alone = beam_search(model, prompt[None], **kw)  # no mask, no padding
        got = batch.sequences[2 * row:2 * row + 2, 8 - len(prompt):]  # (2, T) without the left padding
        width = alone.sequences.shape[1]
        assert torch.equal(got[:, :width], alone.sequences) and bool((got[:, width:] == PAD).all())
        assert torch.allclose(batch.scores[2 * row:2 * row + 2], alone.scores, atol=1e-5)
    assert _finishes_early(batch.sequences, 8, [eos])


def test_zero_new_tokens_returns_the_prompt():
    torch.manual_seed(0)
    model = fk.Transformer(fk.ModelConfig.from_preset("gpt2", **SMALL)).eval()
    ids = torch.randint(0, 64, (2, 4), generator=torch.Generator().manual_seed(0))
    out = beam_search(model, ids, num_beams=3, max_new_tokens=0, num_return_sequences=2)
    assert torch.equal(out.sequences, ids.repeat_interleave(2, 0))
    assert torch.equal(out.scores, torch.zeros(4))


def test_bool_and_float_masks_act_like_integer_masks():
    model = _peaked_llama()
    ids, mask = _left_padded_prompts(64)
    expected = beam_search(model, ids, attention_mask=mask, num_beams=2, max_new_tokens=3)
    for other in (mask.bool(), mask.float()):
        out = beam_search(model, ids, attention_mask=other, num_beams=2, max_new_tokens=3)
        assert torch.equal(out.sequences, expected.sequences) and torch.equal(out.scores, expected.scores)


# ---------------------------------------------------------------- encoder-decoder against brute force


def _brute_force(model, src, src_mask, *, num_beams, max_new_tokens, length_penalty, early_stopping, n_return,
                 eos, start):
    """The same search as plain Python lists, rerunning encoder and whole decoder prefix every step.

    Per input: expand every running hypothesis by every token, take the best max(2, 1 + n_eos) * k;
    those that end and rank in the first k join the finished list (kept to the k best by score),
    the best k others run on. An input stops once it has k finished hypotheses and either
    early_stopping is True or the best running one can no longer beat the worst finished one.
    """
    k, n_keep = num_beams, max(2, 1 + len(eos)) * num_beams
    best = []
    for b in range(src.shape[0]):
        running, finished = [(0.0, [start])], []
        for t in range(max_new_tokens):
            n = len(running)
            with torch.no_grad():
                logits = model(src[b:b + 1].expand(n, -1), src_mask[b:b + 1].expand(n, -1),
                               decoder_input_ids=torch.tensor([toks for _, toks in running])).logits[:, -1]
            log_probs = logits.float().log_softmax(-1).tolist()
            cands = sorted(((s + lp, toks + [v]) for (s, toks), row in zip(running, log_probs, strict=True)
                            for v, lp in enumerate(row)), key=lambda c: -c[0])[:n_keep]
            ends = [toks[-1] in eos or t + 1 == max_new_tokens for _, toks in cands]
            finished += [(s / (t + 1) ** length_penalty, toks) for i, (s, toks) in enumerate(cands[:k]) if ends[i]]
            finished = sorted(finished, key=lambda f: -f[0])[:k]
            running = [c for c, e in zip(cands, ends, strict=True) if not e][:k]
            best_len = max_new_tokens if early_stopping == "never" and length_penalty > 0 else t + 1
            if len(finished) == k and (early_stopping is True or not running
                                       or running[0][0] / best_len ** length_penalty <= finished[-1][0]):
                break
        best.append(finished[:n_return])
    width = max(len(toks) for hyps in best for _, toks in hyps)
    sequences = torch.tensor([toks + [PAD] * (width - len(toks)) for hyps in best for _, toks in hyps])
    return sequences, torch.tensor([s for hyps in best for s, _ in hyps])


@pytest.mark.parametrize("num_beams, length_penalty, early_stopping, n_return", [
    (3, 1.0, True, 2),
    (4, 2.0, False, 1),
    (2, 1.0, "never", 2),
    (3, 0.5, False, 3),
])
def test_encoder_decoder_equals_brute_force(num_beams, length_penalty, early_stopping, n_return):
    torch.manual_seed(1)  # a random model under which every case has a hypothesis that ends early
    model = fk.Transformer(fk.ModelConfig.from_preset(
        "vaswani-base", **{**SMALL, "n_decoder_layers": 2, "init_std": 0.3})).eval()
    src = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    src_mask = torch.ones_like(src)
    src_mask[1, 5:] = 0
    first = model(src, src_mask, decoder_input_ids=torch.zeros(2, 1, dtype=torch.long)).logits[:, -1].argmax(-1)
    eos = [int(first[0]), int(first[1])]  # each source's likeliest first token ends a hypothesis
    kw = dict(num_beams=num_beams, max_new_tokens=8, length_penalty=length_penalty, early_stopping=early_stopping)
    expected, scores = _brute_force(model, src, src_mask, n_return=n_return, eos=eos, start=0, **kw)
    out = beam_search(model, src, attention_mask=src_mask, num_return_sequences=n_return, eos_token_id=eos,
                      pad_token_id=PAD, decoder_start_token_id=0, **kw)
    assert torch.equal(out.sequences, expected)
    assert (out.scores - scores).abs().max() < 1e-5
    assert bool(torch.isin(out.sequences[:, 1:-1], torch.tensor(eos)).any())  # some hypothesis ended early


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs():
    torch.manual_seed(0)
    model = fk.Transformer(fk.ModelConfig.from_preset("gpt2", **SMALL)).eval()
    ids = torch.ones(2, 4, dtype=torch.long)
    cases = [
        (dict(num_beams=0), "num_beams must be an integer >= 1"),
        (dict(num_beams=2, num_return_sequences=3), r"num_return_sequences must be in \[1, num_beams=2\]"),
        (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
        (dict(early_stopping="sometimes"), "early_stopping must be"),
        (dict(eos_token_id=64), r"eos_token_id=64 is outside the vocabulary \[0, 64\)"),
        (dict(decoder_start_token_id=0), "decoder_start_token_id is for encoder-decoder"),
        (dict(temperature=0.7), "does not sample"),
        (dict(stop=[[3, 4]]), "stops at EOS ids only"),
        (dict(attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])), "LEFT padding"),
        (dict(attention_mask=torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]])), "all padding"),
        (dict(attention_mask=torch.ones(2, 3, dtype=torch.long)), "same shape"),
    ]
    for kw, message in cases:
        with pytest.raises(fk.InputError, match=message):
            beam_search(model, ids, **kw)
    with pytest.raises(fk.InputError, match="empty"):
        beam_search(model, torch.ones(1, 0, dtype=torch.long))
    with pytest.raises(fk.InputError, match=r"shape \(batch, seq_len\)"):
        beam_search(model, torch.ones(4, dtype=torch.long))
    encoder = fk.Transformer(fk.ModelConfig.from_preset("minilm-l6", **SMALL))
    with pytest.raises(fk.InputError, match="kind='encoder'"):
        beam_search(encoder, ids)
    with pytest.raises(fk.InputError, match=r"'num_beam' is not a generation option \(did you mean \"num_beams\"\?\)"):
        beam_search(model, ids, num_beam=2)
