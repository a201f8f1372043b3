"""The ``etf-hf`` command. Thin on purpose: argument parsing and error reporting only; `etf_hf.app.runner`,
`etf_hf.app.report` and `etf_hf.app.probe` do the work.

``etf-hf train [CONFIG.yaml] [key=value ...]`` trains every mode of a recipe side by side and prints a
summary table; with no CONFIG it runs the packaged quickstart. ``etf-hf report RUN_DIR ...`` turns run
folders (seeds of one recipe) into a markdown table with paired intervals and plots. ``etf-hf probe
[CONFIG.yaml] ...`` prints a model's per-block collapse table. Recipe and run-folder errors are printed as
one line naming the key or folder, with exit status 2, because a traceback would bury the one thing the
user must change.
"""
from __future__ import annotations

import argparse
import sys

import yaml

from .recipe import ConfigError, apply_overrides, load_config

TRAIN_EPILOG = """\
examples:
  etf-hf train                                   # the packaged quickstart (digits, ViT, full vs etf)
  etf-hf train my.yaml                           # your recipe
  etf-hf train training.num_train_epochs=2       # the quickstart with an override
  etf-hf train my.yaml modes.1.etf.basis=canonical output_dir=runs/canonical
  etf-hf train my.yaml --only etf_canonical,lora training.seed=1 output_dir=runs/s1-more

overrides address nested keys with dots (list items by index) and parse values as YAML.
"""

REPORT_EPILOG = """\
examples:
  etf-hf report runs/quickstart-20250101-120000              # one run: report.md + plots in that folder
  etf-hf train my.yaml training.seed=1 output_dir=runs/s1    # ... one folder per seed, then:
  etf-hf report runs/s0 runs/s1 runs/s2 --output runs/report --baseline full

several folders are seeds of one recipe: modes are grouped by name and compared with the baseline
paired by seed (95 % t-interval; "(within noise)" when it contains 0).
"""

PROBE_EPILOG = """\
examples:
  etf-hf probe                                   # the quickstart's ViT as built (untrained)
  etf-hf probe --mode etf                        # ... with the recipe's 'etf' mode patched in
  etf-hf probe my.yaml --checkpoint runs/x/full  # a trained mode; writes collapse.json into runs/x/full
  etf-hf probe my.yaml --samples 500 --split test model.from_config.num_hidden_layers=2
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="etf-hf", description="Fix transformer feed-forward layers to simplex ETFs "
                                     "(arXiv 2412.00884) and compare against full training.")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"etf-hf {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = commands.add_parser("train", help="train a recipe's modes side by side and compare them",
                                usage="etf-hf train [-h] [--print-config] [--only MODE,...] [CONFIG.yaml] [key=value ...]",
                                description="Train every mode of a YAML recipe with transformers.Trainer and print\n"
                                "a summary table; writes metrics.json, config.yaml, PNG plots and each mode's\n"
                                "trained model to the run folder (default runs/<config name>-<timestamp>).",
                                epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.set_defaults(command_parser=train)
    train.add_argument("args", nargs="*", metavar="CONFIG.yaml key=value",
                       help="recipe file (default: the packaged quickstart.yaml), then overrides")
    train.add_argument("--only", action="append", metavar="MODE[,MODE...]", help="train only these modes of the recipe "
                       "(rows added to a finished table: etf-hf report pairs folders of one seed that hold different "
                       "modes); repeatable")
    train.add_argument("--print-config", action="store_true",
                       help="print the recipe after overrides and validation, then exit without training")
    report = commands.add_parser("report", help="compare run folders (seeds of one recipe): markdown table with "
                                 "paired 95%% intervals, plots", epilog=REPORT_EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="Read the metrics.json of `etf-hf train` run folders and write report.md "
                                 "and PNG plots.")
    report.set_defaults(command_parser=report)
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders written by etf-hf train")
    report.add_argument("--output", metavar="DIR", help="where report.md and the plots go (default: the run folder "
                        "for one run, <common parent>/report-<recipe> for several)")
    report.add_argument("--baseline", metavar="MODE", help="mode the others are compared with (default: the first "
                        "mode that trains every weight)")
    report.add_argument("--metric", metavar="KEY", help="metrics.json key to compare (default: the metric the run "
                        "declares: test_accuracy, or test_perplexity for a causal LM)")
    probe = commands.add_parser("probe", help="per-block neural-collapse table (NCC, NC1, ...) and effective depth",
                                usage="etf-hf probe [-h] [options] [CONFIG.yaml] [key=value ...]",
                                epilog=PROBE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Build a recipe's model (or load a trained mode), measure neural collapse\n"
                                "of every block on a sample of its data, and write collapse.json and collapse.png.")
    probe.set_defaults(command_parser=probe)
    probe.add_argument("args", nargs="*", metavar="CONFIG.yaml key=value",
                       help="recipe file (default: the packaged quickstart.yaml), then overrides")
    probe.add_argument("--mode", metavar="NAME", help="give the model this mode's treatment (ETF patch, "
                       "frozen, LoRA) before measuring, as etf-hf train does")
    probe.add_argument("--checkpoint", metavar="DIR", help="measure a trained mode folder of a run instead")
    probe.add_argument("--output", metavar="DIR", help="folder for collapse.json/.png (default: the checkpoint, "
                       "else runs/probe-<recipe>-<timestamp>)")
    probe.add_argument("--split", choices=("train", "test"), default="train", help="data split (default: train)")
    probe.add_argument("--samples", type=int, default=2000, metavar="N",
                       help="random examples measured (default 2000; 0 = the whole split)")
    probe.add_argument("--pooling", choices=("auto", "cls", "last", "mean", "flat"), default="auto",
                       help="how token features become one vector per example (default: by model type)")
    probe.add_argument("--threshold", type=float, default=0.9, help="NCC accuracy that defines the effective "
                       "depth (default 0.9)")
    commands.add_parser("bench", add_help=False, help="time a training step or inference per FFN treatment (full, "
                        "frozen, LoRA, ETF bases, dense baselines, FFN bounds); etf-hf bench --help for options")
    return parser


def split_train_args(args: list[str]) -> tuple[str | None, list[str]]:
    """First argument is the recipe unless it contains '=' (then every argument is an override)."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def train_command(args: list[str], print_config: bool, only: list[str] | None = None) -> int:
    path, overrides = split_train_args(args)
    raw, name = load_config(path)
    raw = apply_overrides(raw, overrides)
    from .runner import run, select_modes, summary, validate

    spec = validate(raw, name)
    if only:
        spec = select_modes(spec, [name for names in only for name in names.split(",") if name])
    if print_config:
        print(yaml.safe_dump(spec.raw, sort_keys=False), end="")
        return 0
    print(summary(run(spec)))
    return 0


def report_command(options: argparse.Namespace) -> int:
    from .report import write_report

    path, markdown = write_report(options.run_dirs, options.output, options.baseline, options.metric)
    print(markdown)
    print(f"report: {path} (and the PNGs beside it)")
    return 0


def probe_command(options: argparse.Namespace) -> int:
    if not 0 <= options.threshold <= 1:
        raise ConfigError(f"--threshold {options.threshold}: an NCC accuracy threshold lies in [0, 1]")
    if options.samples < 0:
        raise ConfigError(f"--samples {options.samples}: give a number of examples, or 0 for the whole split")
    path, overrides = split_train_args(options.args)
    raw, name = load_config(path)
    raw = apply_overrides(raw, overrides)
    from .probe import format_rows, probe
    from .runner import validate

    spec = validate(raw, name)
    result = probe(spec, mode=options.mode, checkpoint=options.checkpoint, output=options.output,
                   split=options.split, samples=options.samples, pooling=options.pooling,
                   threshold=options.threshold)
    print(f"{spec.name}: neural collapse per block on {result.examples} {options.split} examples")
    print(format_rows(result.report))
    print(f"wrote {result.json_path} and {result.png_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``etf-hf`` and ``python -m etf_hf``; returns the exit status.

    Only argparse, PyYAML and the recipe reader are imported before the arguments are parsed and the recipe
    read: ``--help`` and a missing file answer without importing torch or transformers.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmark parses its own options (argparse would not pass them through)
        from .bench import main as bench_main

        return bench_main(argv[1:], prog="etf-hf bench")
    parser = build_parser()
    options, _ = parser.parse_known_args(argv)  # the command (or --help / --version, which exit here)
    if options.command is None:
        if argv:
            parser.error(f"unrecognized arguments: {' '.join(argv)}")
        parser.print_help(sys.stderr)
        return 2
    start = argv.index(options.command)
    if start:  # the top level takes only -h/--version, which have exited
        parser.error(f"unrecognized arguments: {' '.join(argv[:start])}")
    # intermixed: overrides may follow options (`probe my.yaml --mode etf a.b=1`), as they may precede them
    options = options.command_parser.parse_intermixed_args(argv[start + 1:])
    options.command = argv[start]
    from .report import ReportError

    try:
        if options.command == "report":
            return report_command(options)
        if options.command == "probe":
            return probe_command(options)
        return train_command(options.args, options.print_config, options.only)
    except (ConfigError, ReportError) as error:
        print(f"etf-hf: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
