"""What etf_hf costs besides training: import time, the command line, the remote-code file, save time.

Run on an idle machine (numbers are medians of --repeats runs, interleaved):

    python examples/import_and_save_cost.py               # ~2 minutes on 2 cores
    python examples/import_and_save_cost.py --quick       # tiny settings, to check the script itself
    python examples/import_and_save_cost.py --remote-code # only the remote-code sizes and where they come from

Goals (issue 18): ``import etf_hf`` (and then the library ready to patch) at most 1.15x of importing
transformers with the GPT-2, BERT and ViT model classes; ``etf-hf --help`` at most 2 s; the remote-code
file at most 40 KB for GPT-2 (printed first, per family; sizes, not times, so any load will do); an ETF save of a GPT-2-small config no slower than the vanilla save and
at most 0.1 s of fixed overhead on a 2-layer model.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

CLASSES = "import transformers\nfrom transformers import GPT2LMHeadModel, BertModel, ViTModel"
READY = "import etf_hf\nfrom etf_hf import patch, ETFConfig"
#: name -> (untimed set-up, timed import statements), run in a fresh interpreter
IMPORTS = {
    "transformers + GPT-2/BERT/ViT classes": ("", CLASSES),
    "import etf_hf": ("", "import etf_hf"),
    "import etf_hf + patch, ETFConfig": ("", READY),
    "both (etf_hf ready + the three classes)": ("", f"{READY}\n{CLASSES}"),
    "etf_hf ready, after the three classes (its own cost)": (CLASSES, READY),
}


def _fresh(setup: str, code: str) -> float:
    """Seconds ``code`` takes in a new interpreter after ``setup`` (interpreter start-up excluded)."""
    timed = f"import time\n{setup}\n_start = time.perf_counter()\n{code}\nprint(time.perf_counter() - _start)"
    out = subprocess.run([sys.executable, "-c", timed], capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


def _wall(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, check=False)
    return time.perf_counter() - start


def import_times(repeats: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in IMPORTS}
    for _ in range(repeats):
        for name, (setup, code) in IMPORTS.items():
            samples[name].append(_fresh(setup, code))
    return {name: statistics.median(values) for name, values in samples.items()}


def cli_times(repeats: int) -> dict[str, float]:
    commands = {"python -m etf_hf --help": [sys.executable, "-m", "etf_hf", "--help"],
                "python -m etf_hf train missing.yaml": [sys.executable, "-m", "etf_hf", "train", "missing.yaml"]}
    if shutil.which("etf-hf"):
        commands["etf-hf --help"] = ["etf-hf", "--help"]
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, command in commands.items():
            samples[name].append(_wall(command))
    return {name: statistics.median(values) for name, values in samples.items()}


def _save_seconds(model, folder: str) -> float:
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    model.save_pretrained(folder)
    return time.perf_counter() - start


def _folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))


def save_times(repeats: int, quick: bool) -> dict[str, object]:
    """First save in this process (ETF: remote code generated once per process) and the median of later ones."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    import etf_hf
    from etf_hf.hub import REMOTE_CODE_FILE

    logging.disable_progress_bar()
    sizes = {"2-layer GPT-2 (64 wide)": GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000),
             "GPT-2 small config": GPT2Config(n_layer=2, n_embd=64, n_head=2) if quick else GPT2Config()}
    result: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in sizes.items():
            vanilla = GPT2LMHeadModel(config)
            etf = etf_hf.patch(GPT2LMHeadModel(config), etf_hf.ETFConfig(basis="orthogonal"))
            first = {"vanilla": _save_seconds(vanilla, f"{tmp}/v"), "etf": _save_seconds(etf, f"{tmp}/e")}
            later: dict[str, list[float]] = {"vanilla": [], "etf": []}
            for _ in range(repeats):
                later["vanilla"].append(_save_seconds(vanilla, f"{tmp}/v"))
                later["etf"].append(_save_seconds(etf, f"{tmp}/e"))
            result[name] = {"first save s": first, "median save s": {k: statistics.median(v) for k, v in later.items()},
                            "bytes": {"vanilla": _folder_bytes(f"{tmp}/v"), "etf": _folder_bytes(f"{tmp}/e")},
                            "remote code bytes": os.path.getsize(f"{tmp}/e/{REMOTE_CODE_FILE}")}
    return result


def remote_code_sizes() -> dict[str, dict[str, int]]:
    """Bytes of the generated ``modeling_etf_hf.py`` per family: with the default config (orthogonal frames),
    and with the structured basis (whose code only its checkpoints carry). The file does not depend on the
    model's size, so tiny configs stand for every size."""
    from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM, T5Config, T5ForConditionalGeneration, ViTConfig,
                              ViTForImageClassification)

    import etf_hf
    from etf_hf.hub import remote_code_source

    text = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
    families = {
        "GPT-2": lambda: GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)),
        "BERT": lambda: BertForSequenceClassification(BertConfig(vocab_size=64, **text)),
        "ViT": lambda: ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, **text)),
        "Llama": lambda: LlamaForCausalLM(LlamaConfig(vocab_size=64, **text)),
        "T5": lambda: T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2,
                                                          num_heads=2)),
    }
    configs = {"default (orthogonal)": etf_hf.ETFConfig(), "structured": etf_hf.ETFConfig(basis="structured")}
    return {family: {name: len(remote_code_source(etf_hf.patch(build(), config)).encode())
                     for name, config in configs.items()} for family, build in families.items()}


def remote_code_breakdown(config_kwargs: dict | None = None) -> dict[str, int]:
    """Bytes of a GPT-2 checkpoint's remote code per library module it was copied from (the footer apart):
    where the file's size comes from."""
    import ast

    from transformers import GPT2Config, GPT2LMHeadModel

    import etf_hf
    from etf_hf.hub import SOURCE_MODULES, _defined_names, _module_statements, remote_code_source

    origin = {}
    for module in SOURCE_MODULES:
        for statement in _module_statements(f"{module}.py"):
            for name in _defined_names(statement):
                origin.setdefault(name, module)
    model = etf_hf.patch(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)),
                         etf_hf.ETFConfig(**(config_kwargs or {})))
    sizes: dict[str, int] = {}
    for statement in ast.parse(remote_code_source(model)).body:
        names = sorted(_defined_names(statement))
        module = origin.get(names[0], "footer and imports") if names else "footer and imports"
        sizes[module] = sizes.get(module, 0) + len(ast.unparse(statement).encode()) + 1
    return dict(sorted(sizes.items(), key=lambda item: -item[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 repeat, a tiny model instead of GPT-2 small")
    parser.add_argument("--remote-code", action="store_true",
                        help="only the remote-code sizes, and where a GPT-2 file's bytes come from (no timing)")
    options = parser.parse_args()
    repeats = 1 if options.quick else options.repeats
    sizes = remote_code_sizes()
    print("| remote code (modeling_etf_hf.py) | " + " | ".join(next(iter(sizes.values()))) + " |\n|---|---|---|")
    for family, row in sizes.items():
        print(f"| {family} | " + " | ".join(f"{size / 1000:.1f} KB" for size in row.values()) + " |")
    if options.remote_code:
        for name, kwargs in (("default", {}), ("structured", {"basis": "structured"})):
            print(f"\nGPT-2 remote code ({name}), bytes per source module: {remote_code_breakdown(kwargs)}")
        return
    imports = import_times(repeats)
    base = imports["transformers + GPT-2/BERT/ViT classes"]
    print(f"load average {os.getloadavg()[0]:.2f}; medians of {repeats}")
    print("\n| import (fresh interpreter) | s | x transformers + 3 classes |\n|---|---|---|")
    for name, seconds in imports.items():
        print(f"| {name} | {seconds:.2f} | {seconds / base:.2f} |")
    print("\n| command | wall s |\n|---|---|")
    for name, seconds in cli_times(repeats).items():
        print(f"| {name} | {seconds:.2f} |")
    print("\n| save | vanilla first / median s | ETF first / median s | folder bytes vanilla / ETF | remote code |"
          "\n|---|---|---|---|---|")
    for name, row in save_times(repeats, options.quick).items():
        first, median, size = row["first save s"], row["median save s"], row["bytes"]
        print(f"| {name} | {first['vanilla']:.3f} / {median['vanilla']:.3f} | {first['etf']:.3f} / {median['etf']:.3f} "
              f"| {size['vanilla']:,} / {size['etf']:,} | {row['remote code bytes'] / 1000:.1f} KB |")
    print("\n" + json.dumps({"imports": imports}, indent=None))


if __name__ == "__main__":
    main()
