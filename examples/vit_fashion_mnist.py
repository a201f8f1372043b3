"""A small ViT trained from scratch on Fashion-MNIST: full training vs every FFN fixed to an ETF, per basis,
and vs the controls at the same placement (a norm-matched Gaussian, zeroed weights, the random init frozen).

Uses transformers' Trainer directly (patch -> train -> evaluate). Data: ../shared/data/fashion_mnist's
class-balanced subset (6,000 train / 2,000 test) by default. Reports final-epoch test accuracy, mean ± sd
over seeds and the paired difference to full training with a 95 % t-interval.

    python examples/vit_fashion_mnist.py --epochs 10 --seeds 0 1 2 --json runs/vit_fmnist.json
    python examples/vit_fashion_mnist.py --modes etf-gaussian --include runs/vit_fmnist.json   # add a row
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

import etf_hf
from etf_hf.trainer_metrics import accuracy
from etf_hf.controls import CONTROL_BASES
from etf_hf.app.report import format_interval, paired_interval

REPO = Path(__file__).resolve().parents[1]


class Images(torch.utils.data.Dataset):
    def __init__(self, path: Path) -> None:
        data = np.load(path)
        self.pixels = torch.from_numpy(data["images"]).float().div(255).sub(0.2860).div(0.3530).unsqueeze(1)
        self.labels = torch.from_numpy(data["labels"]).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixels[index], "labels": self.labels[index]}


def build(seed: int, mode: str, args: argparse.Namespace) -> ViTForImageClassification:
    torch.manual_seed(seed)
    model = ViTForImageClassification(ViTConfig(
        image_size=28, patch_size=7, num_channels=1, num_labels=10, hidden_size=args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, intermediate_size=4 * args.hidden))
    if mode != "full":
        etf_hf.patch(model, etf_hf.ETFConfig(basis=mode.split("-", 1)[1], seed=seed))
    return model



def run(seed: int, mode: str, train: Images, test: Images, args: argparse.Namespace) -> dict:
    model = build(seed, mode, args)
    training = TrainingArguments(
        output_dir=str(args.output / f"{mode}-{seed}"), num_train_epochs=args.epochs, learning_rate=args.lr,
        per_device_train_batch_size=128, per_device_eval_batch_size=500, weight_decay=0.05,
        lr_scheduler_type="cosine", warmup_steps=0.05, seed=seed, use_cpu=True, report_to="none",
        save_strategy="no", eval_strategy="no", logging_steps=50, disable_tqdm=True)
    trainer = Trainer(model=model, args=training, train_dataset=train, eval_dataset=test, compute_metrics=accuracy)
    start = time.time()
    trainer.train()
    result = trainer.evaluate()
    summary = etf_hf.parameter_summary(model)
    return {"mode": mode, "seed": seed, "accuracy": result["eval_accuracy"], "seconds": time.time() - start,
            "trainable": summary["trainable"], "total": summary["total"]}


def mode_kind(mode: str) -> str:
    """``baseline``, ``ETF`` or ``control`` (a fixed weight that is not an ETF, see etf_hf.controls)."""
    if mode == "full":
        return "baseline"
    return "control" if mode.split("-", 1)[1] in CONTROL_BASES else "ETF"


def table(results: list[dict], modes: list[str], test_size: int) -> str:
    baseline = {r["seed"]: r["accuracy"] for r in results if r["mode"] == "full"}
    lines = [f"Test set: {test_size:,} images; final-epoch accuracy; Δ = paired difference to full training of the "
             "same seed, 95 % t-interval.", "",
             "| mode | kind | test accuracy % (mean ± sd) | per seed | Δ vs full, paired (95 % CI) | trainable % |",
             "|---|---|---|---|---|---|"]
    for mode in modes:
        runs = [r for r in results if r["mode"] == mode]
        accs = [100 * r["accuracy"] for r in runs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        delta = "–"
        if mode != "full" and baseline:
            delta = format_interval(paired_interval([100 * (r["accuracy"] - baseline[r["seed"]]) for r in runs]))
        share = 100 * runs[0]["trainable"] / runs[0]["total"]
        label = mode.replace("etf-", "control-") if mode_kind(mode) == "control" else mode
        lines.append(f"| {label} | {mode_kind(mode)} | {statistics.mean(accs):.2f} ± {sd:.2f} | "
                     f"{', '.join(f'{a:.2f}' for a in accs)} | {delta} | {share:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "fashion_mnist")
    parser.add_argument("--modes", nargs="+", default=["full", "etf-canonical", "etf-orthogonal", "etf-structured",
                                                        "etf-gaussian", "etf-zero", "etf-frozen"],
                        help="full, or etf-<basis> with an ETF basis or a control (gaussian, zero, frozen; "
                             "also spelled control-<basis>)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=float, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--output", type=Path, default=REPO / "runs" / "vit_fashion_mnist")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--include", nargs="+", type=Path, default=[], metavar="JSON",
                        help="results of earlier runs (their --json files, same settings) to add to the table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    train, test = Images(args.data / "train.npz"), Images(args.data / "test.npz")
    earlier = [json.loads(path.read_text()) for path in args.include]
    for path, previous in zip(args.include, earlier):
        differing = {key for key in ("epochs", "lr", "hidden", "layers", "seeds")
                     if previous["args"][key] != str(vars(args)[key])}
        if differing:
            raise SystemExit(f"--include {path}: ran with different {sorted(differing)}; its rows are not comparable")
    done = {(r["mode"], r["seed"]) for previous in earlier for r in previous["results"]}
    results = [r for previous in earlier for r in previous["results"]]
    results += [run(seed, mode, train, test, args) for seed in args.seeds for mode in args.modes
                if (mode, seed) not in done]
    modes = list(dict.fromkeys(["full", *(r["mode"] for r in results), *args.modes]))
    print(f"ViT {args.layers} x {args.hidden} (patch 7) from scratch, Fashion-MNIST {len(train)} train / "
          f"{len(test)} test, {args.epochs:g} epochs, seeds {args.seeds}, torch {torch.__version__}")
    print(table(results, modes, len(test)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2))


if __name__ == "__main__":
    main()
