"""A small ViT trained from scratch on Fashion-MNIST: full training vs every FFN fixed to an ETF, per basis.

Uses transformers' Trainer directly (patch -> train -> evaluate). Data: ../shared/data/fashion_mnist's
class-balanced subset (6,000 train / 2,000 test) by default. Reports final-epoch test accuracy, mean ± sd
over seeds and the paired difference to full training with a 95 % t-interval.

    python examples/vit_fashion_mnist.py --epochs 10 --seeds 0 1 2 --json runs/vit_fmnist.json
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

import etf_hf

REPO = Path(__file__).resolve().parents[1]
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # two-sided 95 % t quantiles by degrees of freedom


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
        etf_hf.patch(model, etf_hf.ETFConfig(basis=mode.removeprefix("etf-"), seed=seed))
    return model


def accuracy(prediction) -> dict[str, float]:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


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


def table(results: list[dict], modes: list[str]) -> str:
    baseline = {r["seed"]: r["accuracy"] for r in results if r["mode"] == "full"}
    lines = ["| mode | test accuracy % (mean ± sd) | per seed | Δ vs full, paired (95 % CI) | trainable % |",
             "|---|---|---|---|---|"]
    for mode in modes:
        runs = [r for r in results if r["mode"] == mode]
        accs = [100 * r["accuracy"] for r in runs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        delta = "–"
        if mode != "full" and baseline and len(runs) > 1:
            diffs = [100 * (r["accuracy"] - baseline[r["seed"]]) for r in runs]
            mean = statistics.mean(diffs)
            half = T_975[len(diffs) - 1] * statistics.stdev(diffs) / math.sqrt(len(diffs))
            delta = f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]" + (" (noise)" if abs(mean) <= half else "")
        share = 100 * runs[0]["trainable"] / runs[0]["total"]
        lines.append(f"| {mode} | {statistics.mean(accs):.2f} ± {sd:.2f} | {', '.join(f'{a:.2f}' for a in accs)} "
                     f"| {delta} | {share:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "fashion_mnist")
    parser.add_argument("--modes", nargs="+", default=["full", "etf-canonical", "etf-orthogonal", "etf-structured"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=float, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--output", type=Path, default=REPO / "runs" / "vit_fashion_mnist")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train, test = Images(args.data / "train.npz"), Images(args.data / "test.npz")
    results = [run(seed, mode, train, test, args) for seed in args.seeds for mode in args.modes]
    print(f"ViT {args.layers} x {args.hidden} (patch 7) from scratch, Fashion-MNIST {len(train)} train / "
          f"{len(test)} test, {args.epochs:g} epochs, seeds {args.seeds}, torch {torch.__version__}")
    print(table(results, args.modes))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2))


if __name__ == "__main__":
    main()
