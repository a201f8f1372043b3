"""Checkpoint sizes: vanilla vs compact vs dense ETF saves of GPT-2-small and BERT-base configs (fp32).

Run: python examples/checkpoint_sizes.py   (writes ~2.5 GB to a temporary folder, ~1 minute on 2 cores)
"""
from __future__ import annotations

import os
import tempfile

from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

import etf_hf


def weights_size(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def main() -> None:
    print("| model (every FFN projection ETF, orthogonal) | vanilla | compact | dense |\n|---|---|---|---|")
    for name, build in [("GPT-2 small config", lambda: GPT2LMHeadModel(GPT2Config())),
                        ("BERT-base config", lambda: BertModel(BertConfig()))]:
        with tempfile.TemporaryDirectory() as tmp:
            model = build()
            model.save_pretrained(f"{tmp}/vanilla")
            etf_hf.patch(model, etf_hf.ETFConfig(basis="orthogonal"))
            model.save_pretrained(f"{tmp}/compact")
            model.save_pretrained(f"{tmp}/dense", etf_storage="dense")
            vanilla, compact, dense = (weights_size(f"{tmp}/{kind}") for kind in ("vanilla", "compact", "dense"))
            print(f"| {name} | {vanilla / 2**20:.1f} MiB | {compact / 2**20:.1f} MiB ({100 * compact / vanilla:.1f} %) "
                  f"| {dense / 2**20:.1f} MiB ({100 * dense / vanilla:.1f} %) |")


if __name__ == "__main__":
    main()
