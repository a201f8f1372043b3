"""A small ViT trained from scratch with every FFN fixed to an ETF: patch -> Trainer -> save -> reload -> compare.

Data: the Fashion-MNIST subset in ../shared/data/fashion_mnist when present (28x28), else scikit-learn's
bundled 8x8 digits (always installed), so the script runs anywhere. From scratch every block can be
fixed: the ``orthogonal`` basis is regenerated from its seed, so the checkpoint stores no frame at all.
(`examples/vit_fashion_mnist.py` is the multi-seed comparison against full training.)

    python examples/vit_image_classification.py               # 300 steps, a couple of minutes on 2 CPU cores
    python examples/vit_image_classification.py --steps 2
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from transformers import (AutoModelForImageClassification, Trainer, TrainingArguments, ViTConfig,
                          ViTForImageClassification)

import etf_hf
from etf_hf.trainer_metrics import accuracy

FASHION = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fashion_mnist"


def load_images(folder: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(train pixels, train labels, test pixels, test labels, source), pixels (N, 1, H, W) standardised."""
    if (folder / "train.npz").is_file() and (folder / "test.npz").is_file():
        train, test = np.load(folder / "train.npz"), np.load(folder / "test.npz")
        pixels = [torch.from_numpy(d["images"]).float().div(255).unsqueeze(1) for d in (train, test)]
        labels = [torch.from_numpy(d["labels"]).long() for d in (train, test)]
        source = f"Fashion-MNIST subset ({folder})"
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        cut = int(0.8 * len(order))
        pixels = [images[order[:cut]], images[order[cut:]]]
        labels = [torch.tensor(digits.target)[order[:cut]], torch.tensor(digits.target)[order[cut:]]]
        source = "scikit-learn digits (no Fashion-MNIST found)"
    mean, std = pixels[0].mean(), pixels[0].std()
    return (pixels[0] - mean) / std, labels[0], (pixels[1] - mean) / std, labels[1], source


class Images(torch.utils.data.Dataset):
    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor) -> None:
        self.pixels, self.labels = pixels, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixels[index], "labels": self.labels[index]}



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--data-dir", type=Path, default=FASHION)
    parser.add_argument("--output", type=Path, default=Path("runs/examples/vit-etf"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    train_x, train_y, test_x, test_y, source = load_images(args.data_dir)
    side = train_x.shape[-1]
    print(f"data: {source}; {len(train_y)} train / {len(test_y)} test images of {side}x{side}")

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(
        image_size=side, patch_size=7 if side == 28 else 2, num_channels=1, num_labels=10, hidden_size=64,
        num_hidden_layers=4, num_attention_heads=4, intermediate_size=256))
    etf_hf.patch(model, etf_hf.ETFConfig(layers="all", projections="both", basis="orthogonal", seed=0))
    etf_hf.print_trainable_parameters(model)

    training = TrainingArguments(output_dir=str(args.output / "trainer"), max_steps=args.steps, learning_rate=3e-3,
                                 per_device_train_batch_size=64, per_device_eval_batch_size=256, weight_decay=0.05,
                                 lr_scheduler_type="cosine", warmup_steps=0.1, logging_steps=max(1, args.steps // 10),
                                 save_strategy="no", use_cpu=True, report_to="none", seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=training, train_dataset=Images(train_x, train_y),
                      eval_dataset=Images(test_x, test_y), compute_metrics=accuracy)
    trainer.train()
    print(f"test accuracy on {len(test_y)} images: {trainer.evaluate()['eval_accuracy']:.3f}")

    model.save_pretrained(args.output)  # model_type etf_vit; orthogonal frames are regenerated, not stored
    reloaded = AutoModelForImageClassification.from_pretrained(args.output)
    model.eval()
    with torch.no_grad():
        difference = (model(test_x[:8]).logits - reloaded(test_x[:8]).logits).abs().max().item()
    print(f"reloaded from {args.output}: {type(reloaded).__name__}, max |logit difference| {difference:.1e}")
    if difference > 1e-5:
        raise SystemExit(f"the reloaded model computes different logits (max difference {difference:.3g})")

    # Sharing it (needs `huggingface-cli login`):
    #   model.push_to_hub("your-name/vit-etf-fashion-mnist")
    # Where etf_hf is not installed: AutoModelForImageClassification.from_pretrained(repo, trust_remote_code=True);
    # for a checkpoint plain transformers loads without remote code, first etf_hf.materialize(model).


if __name__ == "__main__":
    main()
