"""The paper's MLP with Adaptive-ETF: blocks lock to fixed ETFs during training, once their features collapse.

patch (here: the callback patches block by block) -> Trainer -> save -> reload -> compare.
`AdaptiveETFCallback` measures each hidden block's nearest-class-mean (NCC) accuracy on a probe set
every few steps; a block is locked once it and every block after it (the effective depth) have had NCC
strictly above the threshold for more than ``patience`` checks in a row, to the ETF nearest its current
weight (``basis="nearest"``: the smallest change to what it computes; smooth by default), unless less than
one check interval of training would be left after it. The locks are written to ``config.etf``, so the
saved model reloads with the same blocks fixed.

Data: the Fashion-MNIST subset in ../shared/data/fashion_mnist when present, else scikit-learn's 8x8
digits. (`examples/reproduce_mlp.py` is the full multi-seed reproduction.)

    python examples/mlp_adaptive_etf.py                # 600 steps, ~30 s on 2 CPU cores; blocks 3 and 2 lock
    python examples/mlp_adaptive_etf.py --steps 2
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForImageClassification, Trainer, TrainingArguments

import etf_hf
from etf_hf.trainer_metrics import accuracy

FASHION = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fashion_mnist"


class Images(torch.utils.data.Dataset):
    """Flattened, standardised images and labels: Fashion-MNIST (``split`` of the subset) or sklearn digits."""

    def __init__(self, folder: Path, split: str) -> None:
        path = folder / f"{split}.npz"
        if path.is_file():
            data = np.load(path)
            pixels, labels = data["images"].reshape(len(data["labels"]), -1) / 255.0, data["labels"]
            self.source = f"Fashion-MNIST subset ({folder})"
        else:
            from sklearn.datasets import load_digits

            digits = load_digits()
            half = slice(0, 1400) if split == "train" else slice(1400, None)
            pixels, labels = digits.data[half] / 16.0, digits.target[half]
            self.source = "scikit-learn digits (no Fashion-MNIST found)"
        self.pixels = torch.tensor((pixels - pixels.mean()) / pixels.std(), dtype=torch.float32)
        self.labels = torch.tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixels[index], "labels": self.labels[index]}



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps (default 600)")
    parser.add_argument("--data-dir", type=Path, default=FASHION)
    parser.add_argument("--output", type=Path, default=Path("runs/examples/mlp-adaptive-etf"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    train, test = Images(args.data_dir, "train"), Images(args.data_dir, "test")
    print(f"data: {train.source}; {len(train)} train / {len(test)} test images")

    torch.manual_seed(0)
    model = etf_hf.MLPForImageClassification(etf_hf.CollapseMLPConfig(
        input_size=train.pixels.shape[1], hidden_size=256, num_hidden_layers=4, num_labels=10))
    training = TrainingArguments(output_dir=str(args.output / "trainer"), max_steps=args.steps, learning_rate=0.05,
                                 optim="sgd", per_device_train_batch_size=128, per_device_eval_batch_size=512,
                                 weight_decay=5e-4, lr_scheduler_type="cosine", logging_steps=max(1, args.steps // 10),
                                 save_strategy="no", use_cpu=True, report_to="none", seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=training, train_dataset=train, eval_dataset=test, compute_metrics=accuracy)
    probe = torch.utils.data.Subset(train, range(0, len(train), max(1, len(train) // 1000)))  # ~1000 examples
    callback = etf_hf.AdaptiveETFCallback(probe, threshold=0.9, patience=3, every=max(1, args.steps // 20),
                                          basis="nearest").attach(trainer)
    trainer.train()

    print(f"test accuracy on {len(test)} images: {trainer.evaluate()['eval_accuracy']:.3f}")
    last_ncc = callback.history[-1]["ncc"] if callback.history else []
    print("NCC accuracy per block at the last check:", ", ".join(f"{value:.3f}" for value in last_ncc))
    print(f"locked blocks (block: step): {callback.lock_steps or 'none yet (train longer: --steps 600)'}")
    etf_hf.print_trainable_parameters(model)

    model.save_pretrained(args.output)  # config.etf lists the locked blocks; nearest frames are stored
    reloaded = AutoModelForImageClassification.from_pretrained(args.output)
    model.eval()  # BatchNorm: compare with running statistics, as the reloaded (eval-mode) model uses
    with torch.no_grad():
        difference = (model(test.pixels[:8]).logits - reloaded(test.pixels[:8]).logits).abs().max().item()
    print(f"reloaded from {args.output}: {type(reloaded).__name__}, max |logit difference| {difference:.1e}")
    if difference > 1e-5:
        raise SystemExit(f"the reloaded model computes different logits (max difference {difference:.3g})")

    # Sharing it (needs `huggingface-cli login`):
    #   model.push_to_hub("your-name/mlp-adaptive-etf-fashion-mnist")
    # Where etf_hf is not installed: AutoModelForImageClassification.from_pretrained(repo, trust_remote_code=True)


if __name__ == "__main__":
    main()
