"""Reproduce the paper's MLP experiment on Fashion-MNIST: baseline, fixed-ETF classifier, fixed-ETF last
k hidden layers, and Adaptive-ETF (blocks locked to their nearest ETF once their NCC accuracy stays above
a threshold), over several seeds.

Every mode of a seed starts from the same initial weights (the model is built after the same seed) and
sees the same data order (Trainer's seed), so modes differ only in what is fixed. Per mode it prints the
final-epoch test accuracy (mean ± sd over seeds), the trainable parameters at the end and, for
Adaptive-ETF, the epoch at which each block locked in each seed; it writes ``metrics.json`` and
``ncc_curves.png`` (NCC accuracy of every block per epoch, first seed, one panel per mode).

    python examples/reproduce_mlp.py                      # configs/mlp_fashion_mnist.yaml, the full run
    python examples/reproduce_mlp.py --set training.epochs=2 seeds=[0] data.train_limit=2000   # a smoke run
"""
from __future__ import annotations

import argparse
import gzip
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
import yaml
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

import etf_hf
from etf_hf.trainer_metrics import accuracy
from etf_hf import AdaptiveETFCallback, CollapseMLPConfig, ETFConfig, MLPForImageClassification, collapse_report
from etf_hf.controls import CONTROL_BASES
from etf_hf.app.report import format_interval, paired_interval

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "mlp_fashion_mnist.yaml"
#: Fashion-MNIST training-set pixel mean and std (of x / 255).
MEAN, STD = 0.2860, 0.3530
DEBIAN_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


# ---- data -----------------------------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the original MNIST format, gzipped or not) as a numpy array."""
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def debian_files() -> dict[str, Path] | None:
    """Paths of the four IDX files installed by Debian's ``dataset-fashion-mnist``, or None."""
    try:
        listing = subprocess.run(["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    found = {}
    for line in listing.stdout.splitlines():
        path = Path(line)
        stem = path.name.removesuffix(".gz")
        if path.is_file() and stem in sum(DEBIAN_FILES.values(), ()):
            found[stem] = path
    return found if len(found) == 4 else None


def load_fashion_mnist(data: dict[str, Any]) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
    """{"train": (images uint8 (N,28,28), labels int64), "test": ...} and a description of the source."""
    source = data["source"]
    if source == "digits":
        return _load_digits(), "scikit-learn digits (8 x 8; first 1,400 train, last 397 test)"
    if source == "synthetic":
        return _load_synthetic(), "scikit-learn make_classification (10 classes, 64 features; 8,000 train, 2,000 test)"
    files = debian_files() if source in ("auto", "debian") else None
    if source == "debian" and files is None:
        raise SystemExit("data.source=debian, but dataset-fashion-mnist is not installed (apt install dataset-fashion-mnist)")
    splits = {}
    if files is not None:
        for split, (images, labels) in DEBIAN_FILES.items():
            splits[split] = (_read_idx(files[images]), _read_idx(files[labels]).astype(np.int64))
        description = f"Debian dataset-fashion-mnist ({files[DEBIAN_FILES['train'][0]].parent})"
    else:
        directory = (REPO_ROOT / data["shared_dir"]).resolve()
        for split in ("train", "test"):
            with np.load(directory / f"{split}.npz") as arrays:
                splits[split] = (arrays["images"], arrays["labels"].astype(np.int64))
        description = f"class-balanced subset in {directory}"
    for split in ("train", "test"):
        limit = data.get(f"{split}_limit")
        if limit:
            splits[split] = tuple(array[:limit] for array in splits[split])
    return splits, description


def _load_digits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's 8x8 digits as 0-255 images: a development set for lock settings that is neither shared
    nor published (configs/mlp_digits_dev.yaml), so that choosing on it tunes nothing to a reported table."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(np.rint(digits.images * 16), 0, 255).astype(np.uint8)  # 0..16 -> 0..255
    labels = digits.target.astype(np.int64)
    return {"train": (images[:1400], labels[:1400]), "test": (images[1400:], labels[1400:])}


def _load_synthetic() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A second development set: 10 classes of 2 Gaussian clusters each in 64 dimensions (32 informative),
    5 % of labels flipped -- not separable by class means at the input and never fully memorised early, so
    that NCC rises with depth and the probe loss stays away from 0 (see adaptive_lock_dev_digits.md)."""
    from sklearn.datasets import make_classification

    features, labels = make_classification(n_samples=10_000, n_features=64, n_informative=32, n_redundant=0,
                                           n_classes=10, n_clusters_per_class=2, class_sep=1.0, flip_y=0.05,
                                           random_state=2026)
    pixels = (features * 255).astype(np.float32)  # FashionDataset divides by 255; standardised after
    labels = labels.astype(np.int64)
    return {"train": (pixels[:8000], labels[:8000]), "test": (pixels[8000:], labels[8000:])}


class FashionDataset(torch.utils.data.Dataset):
    """Normalised flat pixels (784,) and labels, held as two tensors (the whole set is ~200 MB at most)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: float = MEAN, std: float = STD) -> None:
        pixels = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)
        self.pixels = (pixels - mean) / std
        self.labels = torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixels[index], "labels": self.labels[index]}


# ---- training -------------------------------------------------------------------------------------------


class NCCMonitor(TrainerCallback):
    """Per-block NCC accuracy on the probe at each epoch end, in the same form as `AdaptiveETFCallback.history`
    (which the adaptive mode uses instead, so its probe is measured once per epoch)."""

    def __init__(self, probe: torch.utils.data.Dataset) -> None:
        self.probe = probe
        self.history: list[dict[str, Any]] = []

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        report = collapse_report(model, self.probe, batch_size=512)
        self.history.append({"step": state.global_step, "epoch": state.epoch, "ncc": report.ncc})



def train_one(mode: dict[str, Any], seed: int, config: dict[str, Any], datasets: dict[str, Any],
              run_dir: Path) -> dict[str, Any]:
    training = config["training"]
    set_seed(seed)
    model = MLPForImageClassification(CollapseMLPConfig(**config["model"], num_labels=10))
    if mode.get("etf"):
        etf_hf.patch(model, ETFConfig(**mode["etf"]))
    args = TrainingArguments(
        output_dir=str(run_dir / mode["name"] / f"seed{seed}"), num_train_epochs=training["epochs"],
        per_device_train_batch_size=training["batch_size"], per_device_eval_batch_size=1024,
        learning_rate=training["learning_rate"], optim="sgd", optim_args=f"momentum={training['momentum']}",
        weight_decay=training["weight_decay"], lr_scheduler_type=training["lr_scheduler"],
        eval_strategy="epoch", logging_strategy="epoch", save_strategy="no", report_to="none", seed=seed,
        dataloader_num_workers=0, disable_tqdm=True, use_cpu=not torch.cuda.is_available())
    trainer = Trainer(model=model, args=args, train_dataset=datasets["train"], eval_dataset=datasets["test"],
                      compute_metrics=accuracy)
    if mode.get("adaptive"):
        monitor = AdaptiveETFCallback(datasets["probe"], every="epoch", batch_size=512,
                                      **mode["adaptive"]).attach(trainer)
    else:
        monitor = NCCMonitor(datasets["probe"])
        trainer.add_callback(monitor)
    started = time.time()
    trainer.train()
    accuracies = [e["eval_accuracy"] for e in trainer.state.log_history if "eval_accuracy" in e]
    steps_per_epoch = trainer.state.max_steps / training["epochs"]
    epoch_of_step = lambda step: round(step / steps_per_epoch, 2)  # noqa: E731 (a gradual lock ends mid-epoch)
    lock_epochs = ({str(block): epoch_of_step(step) for block, step in sorted(monitor.lock_steps.items())}
                   if isinstance(monitor, AdaptiveETFCallback) else {})
    lock_losses = [{**entry, "epoch": epoch_of_step(entry["step"])} for entry in getattr(monitor, "lock_losses", [])]
    late_locks = [{**entry, "epoch": epoch_of_step(entry["step"])} for entry in getattr(monitor, "late_locks", [])]
    return {"seed": seed, "adaptive": isinstance(monitor, AdaptiveETFCallback), "test_accuracy": accuracies[-1],
            "test_accuracy_per_epoch": accuracies, "trainable_params": etf_hf.parameter_summary(model)["trainable"],
            "lock_epochs": lock_epochs, "lock_losses": lock_losses, "late_locks": late_locks, "ncc_history": monitor.history,
            "train_seconds": round(time.time() - started, 1)}


def lock_jumps(run: dict[str, Any]) -> list[float]:
    """The probe-loss jump of each lock of one run, in % of the loss just before it."""
    return [100 * (entry["after"] - entry["before"]) / entry["before"] for entry in run.get("lock_losses", [])]


# ---- reporting ------------------------------------------------------------------------------------------


def summarise(results: dict[str, list[dict[str, Any]]]) -> str:
    lines = [f"{'mode':<16} {'test acc % (final epoch)':>24} {'trainable':>10}  lock epochs per seed (block@epoch)"]
    for name, runs in results.items():
        if not runs:
            continue
        values = [100 * r["test_accuracy"] for r in runs]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        locks = "; ".join(f"seed {r['seed']}: " + (", ".join(f"b{b}@{e:g}" for b, e in r["lock_epochs"].items()) or "none")
                          for r in runs) if runs[0]["adaptive"] else "-"
        trainable = "/".join(f"{t:,}" for t in sorted({r["trainable_params"] for r in runs}))
        jumps = [jump for r in runs for jump in lock_jumps(r)]
        worst = f"; largest probe-loss jump at a lock {max(jumps):+.1f} %" if jumps else ""
        lines.append(f"{name:<16} {statistics.mean(values):>17.2f} ± {spread:<4.2f} {trainable:>10}  {locks}{worst}")
    return "\n".join(lines)


def mode_kind(mode: dict[str, Any]) -> str:
    """``baseline``, ``ETF`` or ``control``: what a table row is, from the basis its frames use."""
    settings = mode.get("etf") or mode.get("adaptive")
    if not settings:
        return "baseline"
    basis = settings.get("basis", "nearest" if mode.get("adaptive") else "orthogonal")
    return "control" if basis in CONTROL_BASES else "ETF"


def _paired_cell(runs: list[dict[str, Any]], reference: dict[int, float]) -> str:
    """Mean per-seed difference (points) to ``reference`` with its 95 % t-interval."""
    return format_interval(paired_interval([100 * (r["test_accuracy"] - reference[r["seed"]]) for r in runs]))


def paired_table(results: dict[str, list[dict[str, Any]]], modes: list[dict[str, Any]], test_size: int,
                 baseline: str = "baseline") -> str:
    """Markdown: each placement's ETF row next to its controls, with paired 95 % intervals.

    Seeds are paired (same initial weights and data order), so intervals are over per-seed differences;
    "(within noise)" marks one that contains 0. Two references: the baseline, and the first ETF row of the same
    placement (for a control: does the ETF geometry beat a non-ETF fixed weight in the same place?).
    Final-epoch accuracy only.
    """
    per_seed = lambda name: {r["seed"]: r["test_accuracy"] for r in results[name]}  # noqa: E731
    ran = [m for m in modes if results.get(m["name"])]  # a run cut short may hold modes without a finished seed
    groups = list(dict.fromkeys(m.get("group", "") for m in ran))
    ran.sort(key=lambda m: groups.index(m.get("group", "")))  # stable: config order inside a placement
    group_etf = {}
    for mode in ran:
        if mode_kind(mode) == "ETF":
            group_etf.setdefault(mode.get("group", ""), mode["name"])
    lines = [f"Test set: {test_size:,} images; final-epoch accuracy; mean ± sd over seeds; Δ = paired difference "
             "(same seed), 95 % t-interval.", "",
             "| placement | mode | kind | test accuracy % | per seed | Δ vs baseline | Δ vs the ETF at this placement "
             "| trainable | locks (block@epoch) | probe-loss jump at each lock |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for mode in ran:
        runs = results[mode["name"]]
        values = [100 * r["test_accuracy"] for r in runs]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        vs_baseline = "–" if mode["name"] == baseline or not results.get(baseline) else _paired_cell(runs, per_seed(baseline))
        etf = group_etf.get(mode.get("group", ""))
        vs_etf = _paired_cell(runs, per_seed(etf)) if mode_kind(mode) == "control" and etf else "–"
        locks = "; ".join(", ".join(f"b{b}@{e:g}" for b, e in r["lock_epochs"].items()) or "none"
                          for r in runs) if runs[0]["adaptive"] else "–"
        trainable = "/".join(f"{t:,}" for t in sorted({r["trainable_params"] for r in runs}))
        jumps = "; ".join(", ".join(f"{j:+.1f} %" for j in lock_jumps(r)) or "none"
                          for r in runs) if runs[0]["adaptive"] else "–"
        lines.append(f"| {mode.get('group', '')} | {mode['name']} | {mode_kind(mode)} | {statistics.mean(values):.2f} ± "
                     f"{spread:.2f} | {', '.join(f'{v:.2f}' for v in values)} | {vs_baseline} | {vs_etf} | {trainable} "
                     f"| {locks} | {jumps} |")
    return "\n".join(lines)


def plot_ncc_curves(results: dict[str, list[dict[str, Any]]], path: Path, threshold: float | None) -> Path:
    from etf_hf.plotting import new_figure, save_figure

    results = {name: runs for name, runs in results.items() if runs}
    columns = min(3, len(results))
    rows = -(-len(results) // columns)
    figure = new_figure(4.5 * columns, 3.4 * rows, dpi=120)
    axes = figure.subplots(rows, columns, sharey=True, squeeze=False)
    for axis in axes.flat[len(results):]:
        axis.set_visible(False)
    for axis, (name, runs) in zip(axes.flat, results.items()):
        history = runs[0]["ncc_history"]
        epochs = [entry["epoch"] for entry in history]
        for block in range(len(history[0]["ncc"])):
            axis.plot(epochs, [entry["ncc"][block] for entry in history], marker=".", label=f"block {block}")
        for block, epoch in runs[0]["lock_epochs"].items():
            axis.axvline(epoch, color=f"C{block}", linestyle=":", alpha=0.7)
        if threshold is not None:
            axis.axhline(threshold, color="grey", linestyle="--", linewidth=0.8)
        axis.set(title=f"{name} (seed {runs[0]['seed']}; dotted: lock epochs)", xlabel="epoch")
    for row in axes:
        row[0].set_ylabel("NCC accuracy (train probe)")
    axes[0][-1].legend(loc="lower right", fontsize="small")
    return save_figure(figure, path)


def set_key(config: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.0.c=value`` override (list items by index); the key must already exist."""
    key, sep, text = assignment.partition("=")
    if not sep:
        raise SystemExit(f"--set {assignment!r}: expected KEY=VALUE")
    *path, last = key.split(".")
    node: Any = config
    try:
        for part in path:
            node = node[int(part)] if isinstance(node, list) else node[part]
        index = int(last) if isinstance(node, list) else last
        if isinstance(node, dict) and last not in node:
            raise KeyError(last)
        node[index] = yaml.safe_load(text)
    except (KeyError, IndexError, ValueError, TypeError):
        raise SystemExit(f"--set {assignment!r}: no such key in the config") from None


def print_merged_table(run_dirs: list[Path], config_path: Path, figure: Path | None = None) -> None:
    """One table from runs made in several invocations (e.g. the controls added later, or more seeds), in
    config order.

    Refuses runs whose data, model or training settings differ (their rows would not be comparable), and a
    mode with two results for one seed.
    """
    results: dict[str, list[dict[str, Any]]] = {}
    settings = set()
    for run_dir in run_dirs:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        settings.add(json.dumps([metrics["data_source"], metrics["config"]["training"], metrics["config"]["model"],
                                 metrics["config"]["data"]], sort_keys=True))
        for name, runs in metrics["results"].items():
            have = {r["seed"] for r in results.get(name, [])}
            if have & {r["seed"] for r in runs}:
                raise SystemExit(f"mode {name!r} has two results for a seed in {run_dirs}")
            results.setdefault(name, []).extend(runs)
    if len(settings) != 1:
        raise SystemExit(f"the runs in {run_dirs} differ in data, model or training: not one table")
    for runs in results.values():
        runs.sort(key=lambda r: r["seed"])
    config = yaml.safe_load(config_path.read_text())
    data = json.loads(settings.pop())[3]
    splits, _ = load_fashion_mnist(data)
    print(paired_table(results, config["modes"], len(splits["test"][1])))
    if figure is not None:
        adaptive = next((m["adaptive"] for m in config["modes"] if m.get("adaptive") and results.get(m["name"])), {})
        ordered = {m["name"]: results[m["name"]] for m in config["modes"] if results.get(m["name"])}
        print(f"wrote {plot_ncc_curves(ordered, figure, adaptive.get('threshold', 0.9))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys, values parsed as YAML: training.epochs=2 seeds=[0] "
                             "data.train_limit=2000 modes.3.adaptive.patience=1")
    parser.add_argument("--modes", nargs="+", help="run only these modes (by name)")
    parser.add_argument("--output-dir", type=Path, help="overrides output_dir")
    parser.add_argument("--table", nargs="+", type=Path, metavar="RUN_DIR",
                        help="train nothing: merge these runs' metrics.json into one paired table (markdown)")
    parser.add_argument("--figure", type=Path, help="with --table: also draw their NCC curves (first seed) here")
    options = parser.parse_args()
    if options.table:
        print_merged_table(options.table, options.config, options.figure)
        return

    config = yaml.safe_load(options.config.read_text())
    for assignment in options.set:
        set_key(config, assignment)
    modes = [m for m in config["modes"] if not options.modes or m["name"] in options.modes]
    if not modes:
        raise SystemExit(f"--modes {options.modes}: known modes are {[m['name'] for m in config['modes']]}")
    run_dir = Path(options.output_dir or REPO_ROOT / config["output_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)

    splits, source = load_fashion_mnist(config["data"])
    train_pixels = splits["train"][0] / 255.0
    scale = (MEAN, STD) if config["data"]["source"] not in ("digits", "synthetic") else (float(train_pixels.mean()), float(train_pixels.std()))
    datasets = {split: FashionDataset(*arrays, *scale) for split, arrays in splits.items()}
    probe_images, probe_labels = (array[:config["data"]["probe_size"]] for array in splits["train"])
    datasets["probe"] = FashionDataset(probe_images, probe_labels, *scale)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"data: {source}; train {len(datasets['train'])}, test {len(datasets['test'])}, "
          f"probe {len(datasets['probe'])}; device: {device}")

    # Seed by seed (every mode of seed 0, then of seed 1, ...): a run cut short still holds whole seeds.
    # metrics.json is rewritten after every run, so what finished is never lost.
    results: dict[str, list[dict[str, Any]]] = {mode["name"]: [] for mode in modes}
    metrics = {"config": config, "data_source": source, "device": device,
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                            "etf_hf": etf_hf.__version__, "python": platform.python_version()},
               "results": results}
    for seed in config["seeds"]:
        for mode in modes:
            outcome = train_one(mode, seed, config, datasets, run_dir)
            results[mode["name"]].append(outcome)
            jumps = ", ".join(f"{j:+.1f} %" for j in lock_jumps(outcome))
            print(f"  {mode['name']:<16} seed {seed}: test accuracy {100 * outcome['test_accuracy']:.2f} %, "
                  f"{outcome['train_seconds']} s" + (f"; locks {outcome['lock_epochs']}, probe-loss jumps {jumps}"
                                                     if outcome["adaptive"] else ""), flush=True)
            (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))

    table = summarise(results)
    print("\n" + table)
    adaptive = next((m["adaptive"] for m in modes if m.get("adaptive")), {})
    curves = plot_ncc_curves(results, run_dir / "ncc_curves.png", adaptive.get("threshold", 0.9))
    metrics["table"] = table
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"\nwrote {run_dir / 'metrics.json'} and {curves}")


if __name__ == "__main__":
    main()
