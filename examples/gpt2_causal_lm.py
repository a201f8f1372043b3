"""GPT-2 causal language model with ETF feed-forward layers: patch -> Trainer -> save -> reload -> compare.

A small GPT-2 (built from a config, no download) learns character-level tiny shakespeare
(../shared/data/tinyshakespeare/input.txt when present, else generated play-like text) with the FFNs of
its last two blocks fixed to matrix-free structured ETFs. Characters are the tokens, so no tokenizer is
needed; the vocabulary is saved next to the model so that generation can decode it.

    python examples/gpt2_causal_lm.py                 # 200 steps, a couple of minutes on 2 CPU cores
    python examples/gpt2_causal_lm.py --steps 2       # a smoke run
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import etf_hf

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
BLOCK = 64  # characters per training example


def corpus(path: Path, size: int) -> tuple[str, str]:
    """(text, where it came from): the file's first ``size`` characters, or generated text of that length."""
    if path.is_file():
        return path.read_text(encoding="utf-8")[:size], str(path)
    rng = np.random.default_rng(0)
    words = "the and thou thee my lord love shall not be what death night heart good sir come".split()
    lines = [f"{rng.choice(['ROMEO', 'JULIET', 'KING'])}:\n" + " ".join(rng.choice(words, 8)) + ".\n\n"
             for _ in range(size // 40 + 1)]
    return "".join(lines)[:size], "generated text (no tiny shakespeare found)"


class Blocks(torch.utils.data.Dataset):
    """Non-overlapping BLOCK-character windows; for a causal LM the labels are the inputs (the model shifts)."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.blocks = ids[: len(ids) // BLOCK * BLOCK].view(-1, BLOCK)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    parser.add_argument("--data", type=Path, default=SHAKESPEARE, help="a plain-text file")
    parser.add_argument("--output", type=Path, default=Path("runs/examples/gpt2-etf"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny matmuls: more threads only contend on a shared 2-core machine

    text, source = corpus(args.data, 200_000)
    vocab = sorted(set(text))
    index = {char: i for i, char in enumerate(vocab)}
    ids = torch.tensor([index[char] for char in text])
    split = int(0.9 * len(ids))
    train, held_out = Blocks(ids[:split]), Blocks(ids[split:])
    print(f"data: {source}; {len(vocab)} characters, {len(train)} train / {len(held_out)} held-out blocks")

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=BLOCK, n_embd=128, n_layer=4, n_head=4,
                                       bos_token_id=0, eos_token_id=0))
    etf_hf.patch(model, etf_hf.ETFConfig(layers="last:2", projections="both", basis="structured", seed=0))
    etf_hf.print_trainable_parameters(model)

    training = TrainingArguments(output_dir=str(args.output / "trainer"), max_steps=args.steps, learning_rate=3e-3,
                                 per_device_train_batch_size=32, per_device_eval_batch_size=64, weight_decay=0.1,
                                 lr_scheduler_type="cosine", warmup_steps=0.1, logging_steps=max(1, args.steps // 10),
                                 save_strategy="no", use_cpu=True, report_to="none", seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=training, train_dataset=train, eval_dataset=held_out)
    trainer.train()
    loss = trainer.evaluate()["eval_loss"]
    print(f"held-out loss {loss:.3f}, perplexity {math.exp(loss):.2f} per character (uniform: {len(vocab)})")

    model.save_pretrained(args.output)  # config.json (model_type etf_gpt2, config.etf), weights, modeling code
    (args.output / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    reloaded = AutoModelForCausalLM.from_pretrained(args.output)  # `import etf_hf` registered etf_gpt2
    model.eval()
    batch = held_out[0]["input_ids"][None]
    with torch.no_grad():
        difference = (model(batch).logits - reloaded(batch).logits).abs().max().item()
    # equal up to float rounding (matmul kernels may sum in a different order for differently aligned memory)
    print(f"reloaded from {args.output}: {type(reloaded).__name__}, max |logit difference| {difference:.1e}")
    if difference > 1e-5:
        raise SystemExit(f"the reloaded model computes different logits (max difference {difference:.3g})")

    prompt = held_out[0]["input_ids"][None, :16]
    sample = reloaded.generate(prompt, max_new_tokens=48, do_sample=False, pad_token_id=0)
    print("greedy sample:", repr("".join(vocab[i] for i in sample[0].tolist())))

    # Sharing it (needs `huggingface-cli login`); the Hub copy loads with trust_remote_code=True even
    # where etf_hf is not installed, because save_pretrained wrote a self-contained modeling file:
    #   model.push_to_hub("your-name/gpt2-etf-shakespeare")
    #   AutoModelForCausalLM.from_pretrained("your-name/gpt2-etf-shakespeare", trust_remote_code=True)
    # or from the Trainer, whose card (training summary) then gets the ETF section, tags and base_model:
    #   etf_hf.keep_etf_card(trainer); trainer.push_to_hub()


if __name__ == "__main__":
    main()
