"""Data: text sources (the embedded default corpus), token corpora, batches, labeled text, parallel text, images."""

from formerkit.data.batches import WindowBatches, eval_batches
from formerkit.data.images import ImageData, load_images
from formerkit.data.labeled import LabeledData, load_labeled_jsonl
from formerkit.data.pairs import ParallelData, load_pairs
from formerkit.data.sources import TextSource, read_jsonl, resolve_source, stdlib_source
from formerkit.data.synthetic import number_to_words, synthetic_pairs
from formerkit.data.tokens import TokenCorpus, cache_key, load_corpus, token_dtype, validation_documents

__all__ = [
    "ImageData",
    "LabeledData",
    "ParallelData",
    "TextSource",
    "TokenCorpus",
    "WindowBatches",
    "cache_key",
    "eval_batches",
    "load_corpus",
    "load_images",
    "load_labeled_jsonl",
    "load_pairs",
    "number_to_words",
    "read_jsonl",
    "resolve_source",
    "stdlib_source",
    "synthetic_pairs",
    "token_dtype",
    "validation_documents",
]
