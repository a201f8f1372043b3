"""The ``etf-hf`` command. Thin on purpose: argument parsing and error reporting only; `etf_hf.train` does the work.

``etf-hf train [CONFIG.yaml] [key=value ...]`` trains every mode of a recipe side by side and prints a
summary table; with no CONFIG it runs the packaged quickstart. Recipe errors are printed as one line
naming the key, with exit status 2, because a traceback would bury the one thing the user must change.
"""
from __future__ import annotations

import argparse
import sys

import yaml

TRAIN_EPILOG = """\
examples:
  etf-hf train                                   # the packaged quickstart (digits, ViT, full vs etf)
  etf-hf train my.yaml                           # your recipe
  etf-hf train training.num_train_epochs=2       # the quickstart with an override
  etf-hf train my.yaml modes.1.etf.basis=canonical output_dir=runs/canonical

overrides address nested keys with dots (list items by index) and parse values as YAML.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="etf-hf", description="Fix transformer feed-forward layers to simplex ETFs "
                                     "(arXiv 2412.00884) and compare against full training.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"etf-hf {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = commands.add_parser("train", help="train a recipe's modes side by side and compare them",
                                usage="etf-hf train [-h] [--print-config] [CONFIG.yaml] [key=value ...]",
                                description="Train every mode of a YAML recipe with transformers.Trainer and print\n"
                                "a summary table; writes metrics.json, config.yaml, PNG plots and each mode's\n"
                                "trained model to the run folder (default runs/<config name>-<timestamp>).",
                                epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("args", nargs="*", metavar="CONFIG.yaml key=value",
                       help="recipe file (default: the packaged quickstart.yaml), then overrides")
    train.add_argument("--print-config", action="store_true",
                       help="print the recipe after overrides and validation, then exit without training")
    commands.add_parser("bench", add_help=False, help="time a training step per FFN treatment (full, frozen, LoRA, "
                        "ETF bases, FFN-free bound); etf-hf bench --help for options")
    return parser


def split_train_args(args: list[str]) -> tuple[str | None, list[str]]:
    """First argument is the recipe unless it contains '=' (then every argument is an override)."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def train_command(args: list[str], print_config: bool) -> int:
    from .train import apply_overrides, load_config, run, summary, validate

    path, overrides = split_train_args(args)
    raw, name = load_config(path)
    spec = validate(apply_overrides(raw, overrides), name)
    if print_config:
        print(yaml.safe_dump(spec.raw, sort_keys=False), end="")
        return 0
    print(summary(run(spec)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``etf-hf`` and ``python -m etf_hf``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmark parses its own options (argparse would not pass them through)
        from .bench import main as bench_main

        return bench_main(argv[1:], prog="etf-hf bench")
    parser = build_parser()
    options = parser.parse_args(argv)
    if options.command is None:
        parser.print_help(sys.stderr)
        return 2
    from .train import ConfigError

    try:
        return train_command(options.args, options.print_config)
    except ConfigError as error:
        print(f"etf-hf: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
