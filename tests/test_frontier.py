"""The cost–quality frontier (`etf_hf.app.frontier`): per-mode model settings (a real tiny run per kind of
setting, and errors naming the key), iso-parameter matches checked against counts of real models, the
Pareto front on hand-made points, and the report's frontier table and plots from small run folders."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from scipy.stats import t
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageClassification

import etf_hf
from etf_hf.app import cli
from etf_hf.app.frontier import pareto_front
from etf_hf.app.report import paired_interval, write_report
from etf_hf.app.runner import ConfigError, load_config, validate
from tests.test_train_tasks import lm_recipe, run_recipe, sequence_recipe


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def gpt2(**settings: Any) -> torch.nn.Module:
    base = {"vocab_size": 256, "n_positions": 64, "n_embd": 16, "n_layer": 2, "n_head": 2, "bos_token_id": None,
            "eos_token_id": None}
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", **{**base, **settings}))


# --------------------------------------------------------------------------------------------------
# Per-mode model settings: real runs
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_per_mode_model_settings_train_models_of_that_size(tmp_path: Path) -> None:
    """A narrower FFN, fewer layers and a derived width, each a real run next to the recipe's model: the saved
    model has the setting, and the row records it with its trainable count."""
    recipe = lm_recipe(tmp_path, [
        {"name": "full"},
        {"name": "etf", "etf": {"layers": "all", "basis": "structured", "seed": 0}},
        {"name": "narrow", "model": {"n_inner": 8}},
        {"name": "shallow", "model": {"n_layer": 1}},
        {"name": "iso", "model": {"n_layer": 1}, "match": {"mode": "etf", "by": "params", "vary": "n_inner"}},
    ])
    metrics = run_recipe(recipe, tmp_path)
    rows = {row["name"]: row for row in metrics["modes"]}
    expected = {"full": gpt2(), "narrow": gpt2(n_inner=8), "shallow": gpt2(n_layer=1)}
    for name, model in expected.items():
        assert rows[name]["trainable_params"] == trainable(model)
    saved = {name: json.loads((Path(rows[name]["model_dir"]) / "config.json").read_text()) for name in rows}
    assert saved["narrow"]["n_inner"] == 8 and saved["narrow"]["n_layer"] == 2
    assert saved["shallow"]["n_layer"] == 1 and rows["shallow"]["model"] == {"n_layer": 1}
    match = rows["iso"]["match"]
    assert rows["iso"]["model"] == {"n_layer": 1, "n_inner": match["value"]} == {
        "n_layer": saved["iso"]["n_layer"], "n_inner": saved["iso"]["n_inner"]}
    assert match["target_trainable_params"] == rows["etf"]["trainable_params"]
    assert match["achieved_trainable_params"] == rows["iso"]["trainable_params"]
    assert abs(match["relative_error"]) <= 0.02
    for row in rows.values():  # cost measured in the same run
        assert row["step_time_s_median"] > 0 and row["step_cpu_time_s_median"] > 0 and row["steps_timed"] == 3
        assert row["peak_memory_bytes"] is not None


@pytest.mark.slow
def test_intermediate_size_setting_trains_a_narrower_vit(tmp_path: Path) -> None:
    """The ViT/BERT spelling of the FFN width, in the packaged quickstart recipe (digits)."""
    raw, _ = load_config(None)
    raw["modes"] = [{"name": "full"}, {"name": "narrow", "model": {"intermediate_size": 8}}]
    raw["training"].update({"max_steps": 2, "num_train_epochs": 1, "disable_tqdm": True})
    raw["output_dir"] = str(tmp_path / "run")
    metrics = run_recipe(raw, tmp_path)
    narrow = metrics["modes"][1]
    config = AutoConfig.for_model(**{**raw["model"]["from_config"], "intermediate_size": 8, "num_labels": 10})
    assert narrow["trainable_params"] == trainable(AutoModelForImageClassification.from_config(config))
    assert json.loads((Path(narrow["model_dir"]) / "config.json").read_text())["intermediate_size"] == 8


# --------------------------------------------------------------------------------------------------
# Iso-parameter derivation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("etf, fixed, vary", [
    ({"layers": "all"}, {}, "n_inner"),
    ({"layers": "all"}, {"n_layer": 1}, "n_inner"),
    ({"layers": "last:1", "projections": "up"}, {}, "n_inner"),
    ({"layers": "last:1"}, {"n_inner": 64}, "n_layer"),
])
def test_derived_dense_model_trains_as_many_weights_as_the_etf_mode(tmp_path: Path, etf: dict, fixed: dict,
                                                                     vary: str) -> None:
    """The derived setting, built as a real model, trains within 2 % of the ETF mode's real count."""
    recipe = lm_recipe(tmp_path, [{"name": "etf", "etf": {**etf, "basis": "orthogonal"}},
                                  {"name": "dense", "model": fixed, "match": {"mode": "etf", "vary": vary}}])
    recipe["model"]["from_config"].update({"n_embd": 32, "n_layer": 4})
    spec = validate(recipe)
    base = {"n_embd": 32, "n_layer": 4}
    target = trainable(etf_hf.patch(gpt2(**base), etf_hf.ETFConfig(**etf, basis="orthogonal")))
    dense = spec.modes[1]
    assert set(dense.model) == {*fixed, vary}
    achieved = trainable(gpt2(**{**base, **dense.model}))
    assert abs(achieved - target) / target <= 0.02
    assert (dense.match.target, dense.match.achieved) == (target, achieved)
    assert spec.raw["modes"][1] == {"name": "dense", "model": fixed, "match": {"mode": "etf", "vary": vary}}


def test_derived_bert_intermediate_size(tmp_path: Path) -> None:
    recipe = sequence_recipe(tmp_path, [{"name": "etf", "etf": {"layers": "all", "basis": "structured"}},
                                        {"name": "dense", "match": {"mode": "etf", "vary": "intermediate_size"}}])
    spec = validate(recipe)
    match = spec.modes[1].match
    assert abs(match.achieved - match.target) / match.target <= 0.02
    assert spec.modes[1].model == {"intermediate_size": match.value}


@pytest.mark.parametrize("mode, message", [
    ({"name": "d", "model": {"n_innr": 8}}, "unknown key modes[1].model.n_innr: GPT2Config has no such setting"),
    ({"name": "d", "model": {"vocab_size": 300}}, "modes[1].model.vocab_size: every mode shares it"),
    ({"name": "d", "model": {"n_embd": 15}}, "modes[1].model: the model could not be built"),
    ({"name": "d", "model": [1]}, "modes[1].model must be a mapping"),
    ({"name": "d", "match": {"mode": "nope", "vary": "n_inner"}}, "modes[1].match.mode 'nope' must name another mode"),
    ({"name": "d", "match": {"mode": "etf"}}, "modes[1].match.vary is required"),
    ({"name": "d", "match": {"mode": "etf", "vary": "n_inner", "by": "time"}}, "modes[1].match.by 'time': only params"),
    ({"name": "d", "match": {"mode": "etf", "vary": "n_inner", "tolerance": 2}}, "modes[1].match.tolerance must lie in"),
    ({"name": "d", "match": {"mode": "etf", "vary": "n_inner", "step": 1}}, "unknown key modes[1].match.step"),
    ({"name": "d", "model": {"n_inner": 8}, "match": {"mode": "etf", "vary": "n_inner"}},
     "modes[1].match.vary 'n_inner' is derived by the match, and modes[1].model sets it too"),
    ({"name": "d", "match": {"mode": "etf", "vary": "n_head"}}, "does not change the trainable count"),
    ({"name": "d", "match": {"mode": "etf", "vary": "n_layer"}}, "modes[1].match: mode 'etf' trains"),
])
def test_model_and_match_errors_name_the_key(tmp_path: Path, mode: dict, message: str) -> None:
    recipe = lm_recipe(tmp_path, [{"name": "etf", "etf": {"layers": "all"}}, mode])
    with pytest.raises(ConfigError) as error:
        validate(recipe)
    assert message in str(error.value)


def test_model_settings_are_refused_for_a_pretrained_model(tmp_path: Path) -> None:
    gpt2().save_pretrained(tmp_path / "model")
    recipe = lm_recipe(tmp_path, [{"name": "full"}, {"name": "narrow", "model": {"n_inner": 8}}])
    recipe["model"] = {"pretrained": str(tmp_path / "model"), "tokenizer": "byte-level"}
    with pytest.raises(ConfigError, match=r"modes\[1\]\.model: a pretrained model's size is fixed by its checkpoint"):
        validate(recipe)


def test_layers_are_checked_against_the_modes_own_depth(tmp_path: Path) -> None:
    recipe = lm_recipe(tmp_path, [{"name": "full"},
                                  {"name": "e", "model": {"n_layer": 1}, "etf": {"layers": [1]}}])
    with pytest.raises(ConfigError, match=r"modes\[1\]\.etf"):
        validate(recipe)


def test_shipped_frontier_recipe_derives_matches_within_two_percent(monkeypatch: pytest.MonkeyPatch) -> None:
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    raw, name = load_config(root / "configs" / "frontier_gpt2_shakespeare.yaml")
    if not Path(raw["data"]["train_file"]).exists():
        pytest.skip("../shared/data is absent")
    matched = [mode for mode in validate(raw, name).modes if mode.match is not None]
    assert len(matched) == 4
    for mode in matched:
        assert abs(mode.match.achieved - mode.match.target) <= 0.02 * mode.match.target


# --------------------------------------------------------------------------------------------------
# The Pareto front
# --------------------------------------------------------------------------------------------------


def test_pareto_front_on_hand_made_points() -> None:
    # (cost, accuracy): 0 cheapest; 1 dominated by 2 (cheaper and better); 3 best and dearest; 4 ties 2
    points = [(1.0, 0.50), (3.0, 0.60), (2.0, 0.70), (5.0, 0.90), (2.0, 0.70), (6.0, 0.90)]
    assert pareto_front(points, higher_is_better=True) == [0, 2, 3, 4]
    # perplexity: lower is better
    assert pareto_front([(1.0, 9.0), (2.0, 8.0), (3.0, 8.5), (4.0, 7.0)], higher_is_better=False) == [0, 1, 3]
    assert pareto_front([(1.0, 1.0)], higher_is_better=True) == [0]


# --------------------------------------------------------------------------------------------------
# The report's frontier section
# --------------------------------------------------------------------------------------------------

#: Hand-made results, three seeds: (name, etf, model, trainable, step seconds by seed, MiB, perplexity by seed).
FRONTIER_MODES = [
    ("full", None, {}, 1000, [1.00, 2.00, 1.00], 100, [5.0, 5.2, 5.1]),
    ("etf_all", {"layers": "all", "basis": "structured"}, {}, 400, [0.90, 1.90, 0.80], 90, [5.5, 5.6, 5.55]),
    ("dense_iso", None, {"n_inner": 2}, 400, [0.50, 1.00, 0.50], 60, [6.0, 6.3, 6.1]),
    ("dense_small", None, {"n_inner": 128}, 600, [0.95, 2.00, 0.90], 95, [5.3, 5.45, 5.4]),
]


def write_frontier_run(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True)
    rows = [{"name": name, "kind": "etf" if etf else "full", "etf": etf, "model": model, "test_perplexity": ppl[seed],
             "test_loss": 1.0, "trainable_params": count, "trainable_percent": 100.0 * count / 1000,
             "step_time_s_median": steps[seed], "peak_memory_bytes": mib * 2**20 + seed,
             "load_average": {"start": [1.5 + seed, 1.0, 1.0], "end": [1.0, 1.0, 1.0]}}
            for name, etf, model, count, steps, mib, ppl in FRONTIER_MODES]
    metrics = {"config_name": "frontier", "task": "causal-lm", "data": {"source": "text", "test_examples": 100},
               "metric": {"name": "perplexity", "key": "test_perplexity", "higher_is_better": False}, "modes": rows}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    config = {"task": "causal-lm", "data": {"source": "text"}, "training": {"seed": seed},
              "modes": [{"name": name, "etf": etf, "model": model} for name, etf, model, *_ in FRONTIER_MODES]}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


def test_report_frontier_table_and_plots(tmp_path: Path) -> None:
    runs = [write_frontier_run(tmp_path / f"s{seed}", seed) for seed in range(3)]
    path, markdown = write_report(runs, tmp_path / "report")
    section = markdown[markdown.index("## Cost–quality frontier"):]
    table = section[:section.index("Each non-dense mode")]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in table.splitlines() if line.startswith("| ") and not line.startswith("| mode")}
    # step time: ratio to full's in the same run, averaged over seeds
    ratio = statistics.fmean(s / f for s, f in zip(FRONTIER_MODES[1][4], FRONTIER_MODES[0][4]))
    assert rows["etf_all"][4] == f"{ratio:.2f}" and rows["full"][4] == "1.00"
    assert rows["etf_all"][3] == "400" and rows["dense_iso"][2] == "n_inner=2"
    # mean and 95 % t-interval of the mean, computed here from the textbook formula
    ppl = FRONTIER_MODES[1][6]
    half = t.ppf(0.975, 2) * statistics.stdev(ppl) / 3 ** 0.5
    mean = statistics.fmean(ppl)
    assert rows["etf_all"][6] == f"{mean:.2f} [{mean - half:.2f}, {mean + half:.2f}]"
    # fronts (lower perplexity is better): params: dense_iso 400, etf_all 400 (better) -> etf on, dense_iso off
    assert rows["etf_all"][7] == "yes / yes / yes"
    assert rows["dense_iso"][7] == "no / yes / yes"
    assert rows["dense_small"][7] == "yes / yes / yes"  # dearer than etf_all on every axis, but better
    assert rows["full"][7] == "yes / yes / yes"
    # equal-cost comparison: etf_all vs the cheapest dense costing as much (params: dense_iso at 400)
    comparison = [line for line in section.splitlines() if line.startswith("| etf_all | params |")][0]
    delta = paired_interval([e - d for e, d in zip(FRONTIER_MODES[1][6], FRONTIER_MODES[2][6])])
    assert "dense_iso (400 vs 400)" in comparison and f"{delta.mean:+.2f}".replace("-", "−") in comparison
    assert "**better**" in comparison
    time_row = [line for line in section.splitlines() if line.startswith("| etf_all | time |")][0]
    assert "dense_small (0.95 vs 0.88)" in time_row and " worse" in time_row
    for axis in ("params", "time", "memory"):
        png = tmp_path / "report" / f"report_frontier_{axis}.png"
        assert png.stat().st_size > 10_000 and f"![report_frontier_{axis}](report_frontier_{axis}.png)" in markdown
    assert "load average at the start of the modes' training: 1.5–3.5" in section


def test_report_prefers_cpu_time_when_every_row_has_it(tmp_path: Path) -> None:
    """On a loaded CPU machine wall time includes waits for a core; the time axis then uses CPU time."""
    runs = [write_frontier_run(tmp_path / f"s{seed}", seed) for seed in range(3)]
    for run in runs:
        metrics = json.loads((run / "metrics.json").read_text())
        for row in metrics["modes"]:
            row["step_cpu_time_s_median"] = {"full": 0.4, "etf_all": 0.2}.get(row["name"], 0.1)
        (run / "metrics.json").write_text(json.dumps(metrics))
    _, markdown = write_report(runs, tmp_path / "report")
    assert "optimizer-step CPU time (process)" in markdown
    assert "| etf_all | ETF: structured | recipe's | 400 | 0.50 |" in markdown


def test_report_without_cost_measurements_has_no_frontier(tmp_path: Path) -> None:
    run = write_frontier_run(tmp_path / "s0", 0)
    metrics = json.loads((run / "metrics.json").read_text())
    for row in metrics["modes"]:
        del row["step_time_s_median"]
    (run / "metrics.json").write_text(json.dumps(metrics))
    _, markdown = write_report([run])
    assert "Cost–quality frontier" not in markdown and not (run / "report_frontier_params.png").exists()


def test_cli_report_prints_the_frontier(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = [str(write_frontier_run(tmp_path / f"s{seed}", seed)) for seed in range(3)]
    assert cli.main(["report", *runs, "--output", str(tmp_path / "out")]) == 0
    assert "## Cost–quality frontier" in capsys.readouterr().out
