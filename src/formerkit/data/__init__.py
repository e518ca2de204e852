"""Data: text sources (the embedded default corpus included), cached token corpora, batches, labeled text."""

from formerkit.data.batches import WindowBatches, eval_batches
from formerkit.data.labeled import LabeledData, load_labeled_jsonl
from formerkit.data.sources import TextSource, read_jsonl, resolve_source, stdlib_source
from formerkit.data.tokens import TokenCorpus, cache_key, load_corpus, token_dtype, validation_documents

__all__ = [
    "LabeledData",
    "TextSource",
    "TokenCorpus",
    "WindowBatches",
    "cache_key",
    "eval_batches",
    "load_corpus",
    "load_labeled_jsonl",
    "read_jsonl",
    "resolve_source",
    "stdlib_source",
    "token_dtype",
    "validation_documents",
]
