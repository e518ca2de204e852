"""The ``formerkit generate`` subcommand: text from a checkpoint, streamed for one prompt, batched for several."""

from __future__ import annotations

import argparse
import sys

from formerkit.checkpoints import from_pretrained
from formerkit.cliargs import positive_int
from formerkit.generate.config import GenerationConfig
from formerkit.generate.text import generate_text
from formerkit.tokenizers import load_tokenizer


def config_from_args(args: argparse.Namespace) -> GenerationConfig:
    """The GenerationConfig of ``formerkit generate``'s options (validated: InputError names a bad combination)."""
    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                            seed=args.seed, stop_strings=tuple(args.stop or ()), num_beams=args.num_beams,
                            cache_policy=args.cache_policy)


def cmd_generate(args: argparse.Namespace) -> None:
    """Print the continuation of each ``--prompt``: streamed as it is generated for one prompt, else batched."""
    config = config_from_args(args)
    model = from_pretrained(args.checkpoint)
    tokenizer = load_tokenizer(args.checkpoint)
    prompts = args.prompt or [""]
    options = dict(truncate=args.truncate, heal=args.heal)
    if len(prompts) == 1 and not args.no_stream and config.num_beams == 1:
        for piece in generate_text(model, tokenizer, prompts[0], config, stream=True, **options):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    texts = generate_text(model, tokenizer, prompts, config, **options)
    for i, text in enumerate(texts):
        print(text if len(texts) == 1 else f"--- {i + 1} ---\n{text}")


def add_generate_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``generate`` on the ``formerkit`` subparsers; return its parser (which runs ``cmd_generate``)."""
    p = subparsers.add_parser("generate", help="generate text from a causal LM or encoder-decoder checkpoint "
                                               "(KV cache; greedy unless --temperature > 0)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory or training run directory")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="text to continue; repeat for a batch (default: start from end-of-text)")
    p.add_argument("--max-new-tokens", type=positive_int, default=100, help="most tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=positive_int, default=None,
                   help="sample among the k most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample from the smallest set holding this probability (default: off)")
    p.add_argument("--min-p", type=float, default=None,
                   help="drop tokens less likely than this fraction of the most likely one (default: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide the logits of tokens already present by this (1: none)")
    p.add_argument("--stop", action="append", metavar="STR",
                   help="stop a text once it contains STR (repeatable; default: none)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed for reproducible sampling (default: a fresh random draw)")
    p.add_argument("--truncate", choices=["left", "right"], default=None,
                   help="cut a prompt too long for the model's context to fit with --max-new-tokens: left drops its "
                        "start, right its end (default: a too-long prompt is an error)")
    p.add_argument("--heal", action="store_true",
                   help="token healing: take back a prompt's last token (a trailing space, a half word) and make the "
                        "first new token start with its text, as the model saw such text in training")
    p.add_argument("--no-stream", action="store_true", help="print a single prompt's text only when it is done")
    p.add_argument("--num-beams", type=positive_int, default=1,
                   help="beam search with this many beams (> 1; e.g. to translate with an encoder-decoder run), "
                        "printed when done; not with sampling (--temperature > 0), --repetition-penalty, --stop "
                        "or --heal")
    p.add_argument("--cache-policy", default="full", metavar="KIND[:BUDGET[:EXTRA]]",
                   help="KV-cache eviction under a token budget: full, sliding:B, sinks:B[:SINKS] (StreamingLLM), "
                        "h2o:B[:RECENT], tova:B; memory stays O(B) however long the generation (decoder-only, "
                        "not with --num-beams)")
    p.set_defaults(func=cmd_generate)
    return p
