"""Translation quality of hypotheses against references: BLEU and chrF as sacrebleu reports them, and exact match."""

from __future__ import annotations

from collections.abc import Sequence

import sacrebleu

from formerkit.errors import InputError


def exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Share of hypotheses equal to their reference after stripping surrounding whitespace, in [0, 1]."""
    _check(hypotheses, references)
    return sum(h.strip() == r.strip() for h, r in zip(hypotheses, references, strict=True)) / len(references)


def translation_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu defaults: 13a tokenization, chrF2; both 0-100) and exact match (0-1).

    One reference per hypothesis. Returns {"bleu", "chrf", "exact_match"}.
    """
    _check(hypotheses, references)
    hyps, refs = list(hypotheses), [list(references)]
    return {"bleu": sacrebleu.corpus_bleu(hyps, refs).score, "chrf": sacrebleu.corpus_chrf(hyps, refs).score,
            "exact_match": exact_match(hypotheses, references)}


def _check(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    """Raise InputError unless there are as many hypotheses as references, at least one, all strings."""
    if len(hypotheses) != len(references) or not references:
        raise InputError(f"need one hypothesis per reference and at least one pair, got {len(hypotheses)} "
                         f"hypotheses and {len(references)} references")
    if not all(isinstance(t, str) for t in [*hypotheses, *references]):
        raise InputError("hypotheses and references must be strings")
