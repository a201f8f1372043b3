"""`etf-hf train`: a tiny end-to-end run, the packaged default recipe, and recipe errors that name their key."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from etf_hf.app import cli
from etf_hf.app.runner import DEFAULT_CONFIG, ConfigError, apply_overrides, load_config, validate
from isolated import run_python

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Shrinks the quickstart to seconds: a 1-block, 16-wide ViT and 3 optimizer steps per mode.
TINY = ["model.from_config.hidden_size=16", "model.from_config.num_hidden_layers=1",
        "model.from_config.num_attention_heads=2", "model.from_config.intermediate_size=32",
        "training.max_steps=3", "training.logging_steps=1", "training.per_device_train_batch_size=64",
        "training.disable_tqdm=true"]


def test_tiny_run_writes_metrics_plot_and_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(DEFAULT_CONFIG.read_text())
    run_dir = tmp_path / "run"
    assert cli.main(["train", str(recipe), *TINY, f"output_dir={run_dir}"]) == 0

    metrics = json.loads((run_dir / "metrics.json").read_text())
    modes = {m["name"]: m for m in metrics["modes"]}
    assert set(modes) == {"full", "etf", "control-gaussian"}
    assert modes["control-gaussian"]["trainable_params"] == modes["etf"]["trainable_params"]   # same placement
    assert metrics["config_name"] == "tiny"
    assert modes["etf"]["trainable_params"] < modes["full"]["trainable_params"]
    assert modes["full"]["trainable_percent"] == 100 and modes["etf"]["etf_fixed_params"] > 0
    for mode in modes.values():
        assert mode["steps"] == 3 and len(mode["train_loss"]) == 3
        assert 0 <= mode["test_accuracy"] <= 1

    png = (run_dir / "training_loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    from matplotlib.image import imread
    assert imread(run_dir / "training_loss.png").ndim == 3
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["training"]["max_steps"] == 3

    table = capsys.readouterr().out
    assert "test acc" in table and "trainable %" in table and "\netf " in table

    from transformers import AutoModelForImageClassification
    reloaded = AutoModelForImageClassification.from_pretrained(run_dir / "etf")
    assert reloaded.config.etf["basis"] == "orthogonal"


def test_only_and_a_mode_s_own_training_settings_then_one_report(tmp_path: Path) -> None:
    """Rows added to a finished run: ``--only`` trains a subset into another folder of the same seed, a mode's
    ``training`` reaches its Trainer (read back from the saved training_args.bin), and `etf-hf report` pairs
    the two folders as one seed."""
    import torch

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(DEFAULT_CONFIG.read_text())
    own = ["modes.1.training.learning_rate=0.25", "modes.1.training.weight_decay=0.5"]
    assert cli.main(["train", str(recipe), "--only", "full", *TINY, *own, f"output_dir={tmp_path / 'first'}"]) == 0
    assert cli.main(["train", str(recipe), "--only", "etf", "--only", "control-gaussian", *TINY, *own,
                     f"output_dir={tmp_path / 'added'}"]) == 0
    first = json.loads((tmp_path / "first" / "metrics.json").read_text())
    added = json.loads((tmp_path / "added" / "metrics.json").read_text())
    assert [row["name"] for row in first["modes"]] == ["full"]
    assert [row["name"] for row in added["modes"]] == ["etf", "control-gaussian"]
    assert added["modes"][0]["training"] == {"learning_rate": 0.25, "weight_decay": 0.5}
    assert added["modes"][1]["training"] == {}
    base = validate(*load_config(recipe)).training
    for mode, lr, decay in (("first/full", base["learning_rate"], base["weight_decay"]), ("added/etf", 0.25, 0.5),
                            ("added/control-gaussian", base["learning_rate"], base["weight_decay"])):
        args = torch.load(tmp_path / mode / "training_args.bin", weights_only=False)
        assert (args.learning_rate, args.weight_decay, args.max_steps) == (lr, decay, 3), mode
    assert cli.main(["report", str(tmp_path / "first"), str(tmp_path / "added"), "--output", str(tmp_path / "r")]) == 0
    report = (tmp_path / "r" / "report.md").read_text()
    for mode in ("full", "etf", "control-gaussian"):
        assert f"| {mode} |" in report


def test_a_mode_s_own_training_settings_reach_its_treatment_checks() -> None:
    """Adaptive-ETF's ``every: eval`` needs evaluations: a mode that turns them on for itself validates, the
    same mode without them is refused (the treatment is checked against the merged settings)."""
    raw, name = load_config(None)
    adaptive = {"name": "adaptive", "adaptive": {"every": "eval"}}
    with pytest.raises(ConfigError, match=r"modes\[1\]\.adaptive\.every is 'eval'"):
        validate({**raw, "modes": [{"name": "full"}, adaptive]}, name)
    spec = validate({**raw, "modes": [{"name": "full"}, {**adaptive, "training": {"eval_strategy": "epoch"}}]}, name)
    assert spec.modes[1].training == {"eval_strategy": "epoch"} and spec.modes[0].training == {}


def test_packaged_default_config_is_the_quickstart(capsys: pytest.CaptureFixture[str]) -> None:
    raw, name = load_config(None)
    spec = validate(raw, name)
    assert name == "quickstart" and spec.task == "image-classification"
    assert [m.name for m in spec.modes] == ["full", "etf", "control-gaussian"]
    assert spec.modes[0].etf is None and spec.modes[1].etf.basis == "orthogonal"
    assert spec.modes[2].etf.basis == "gaussian" and spec.modes[2].etf.layers == spec.modes[1].etf.layers
    assert cli.main(["train", "--print-config"]) == 0
    assert "sklearn_digits" in capsys.readouterr().out
    top_level = REPO_ROOT / "configs" / "quickstart.yaml"
    assert DEFAULT_CONFIG.read_text() == top_level.read_text(), (
        f"the packaged recipe drifted from the canonical one: cp {top_level} {DEFAULT_CONFIG}")


def test_overrides_address_nested_keys_and_list_items() -> None:
    config = {"training": {"seed": 0}, "modes": [{"name": "a", "etf": None}, {"name": "b", "etf": {}}]}
    apply_overrides(config, ["training.seed=3", "training.bf16=false", "modes.1.etf.basis=canonical",
                             "modes.0.etf=null", "output_dir=runs/x", "training.report_to=[]"])
    assert config["training"] == {"seed": 3, "bf16": False, "report_to": []}
    assert config["modes"][1]["etf"] == {"basis": "canonical"}
    assert config["output_dir"] == "runs/x"


def test_yaml_exponent_without_dot_is_read_as_a_float() -> None:
    raw, name = load_config(None)
    spec = validate(apply_overrides(raw, ["training.learning_rate=1e-3"]), name)
    assert spec.training["learning_rate"] == pytest.approx(1e-3)


@pytest.mark.parametrize("overrides, expected", [
    (["bogus=1"], ["bogus", "task, model, data, modes, training, output_dir, torch_threads"]),
    (["torch_threads=0"], ["torch_threads", "positive integer"]),
    (["task=translation"], ["task 'translation'", "image-classification"]),
    (["training=5"], ["training must be", "int"]),
    (["data.test_fraction=abc"], ["data.test_fraction", "number"]),
    (["data.source=mnist"], ["data.source 'mnist'", "sklearn_digits"]),
    (["training.lerning_rate=0.1"], ["training.lerning_rate", "'learning_rate'"]),
    (["training.max_steps=many"], ["training.max_steps", "int"]),
    (["training.learning_rate=-0.1"], ["training: the optimizer", "learning_rate", "Invalid learning rate: -0.1"]),
    (["training.adam_beta1=1.5"], ["training: the optimizer", "adam_beta1", "Invalid beta parameter"]),
    (["training.lr_scheduler_kwargs={bogus: 1}"], ["training: the learning-rate schedule", "lr_scheduler_kwargs",
                                                   "bogus"]),
    (["training.eval_strategy=sometimes"], ["training.eval_strategy='sometimes'", "invalid choice"]),
    (["training.bf16=maybe"], ["training.bf16='maybe'", "TrainingArguments.bf16"]),
    (["training.seed=1.5"], ["training.seed=1.5", "invalid int value"]),
    (["training.save_strategy=no"], ["training.save_strategy=False", "quote it, e.g. save_strategy: \"no\""]),
    (["modes.1.training.learning_rate=-1"], ["modes[1].training: the optimizer", "Invalid learning rate"]),
    (["training.output_dir=x"], ["training.output_dir", "top-level output_dir"]),
    (["model.from_config.hidden_sise=8"], ["model.from_config.hidden_sise"]),
    (["model.from_config.model_type=nope"], ["model.from_config.model_type 'nope'"]),
    (["model.tokenizer=byte-level"], ["model.tokenizer is only read by text tasks"]),
    (["model.pretrained=/no/such/model"], ["model", "exactly one of"]),
    (["modes.1.etf.basis=fancy"], ["modes[1].etf", "basis", "orthogonal"]),
    (["modes.1.etf.colour=red"], ["modes[1].etf.colour"]),
    (["modes.1.etf.layers=last:9"], ["modes[1].etf", "only 4 blocks"]),
    (["modes.1.name=full"], ["modes[1].name 'full'", "unique"]),
    (["modes=[]"], ["modes must list at least one mode"]),
    (["training.seed=1", "training.seed"], ["override 'training.seed'", "key.subkey=value"]),
    (["modes.1.training=5"], ["modes[1].training must be", "mapping"]),
    (["modes.1.training.lerning_rate=0.1"], ["modes[1].training.lerning_rate", "'learning_rate'"]),
    (["modes.1.training.seed=3"], ["modes[1].training sets the seed", "training.seed=N"]),
    (["modes.1.training.output_dir=x"], ["modes[1].training.output_dir", "top-level output_dir"]),
    (["modes.1.training.lr_scheduler_type=zigzag"], ["modes[1].training.lr_scheduler_type='zigzag'",
                                                      "invalid choice"]),
    (["training.warmup_steps=-1"], ["training: TrainingArguments rejected", "warmup_steps >= 0"]),
    (["--only", "etf,nope"], ["--only nope: not a mode of this recipe", "full, etf, control-gaussian"]),
])
def test_recipe_errors_name_the_key(overrides: list[str], expected: list[str],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["train", *overrides, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("etf-hf: error: ") and "Traceback" not in err
    for fragment in expected:
        assert fragment in err


def test_missing_pretrained_path_and_missing_file_are_named(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    raw, name = load_config(None)
    raw["model"] = {"pretrained": str(tmp_path / "no-model")}
    with pytest.raises(ConfigError, match="model.pretrained"):
        validate(raw, name)
    assert cli.main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml' not found" in capsys.readouterr().err


@pytest.mark.slow  # fresh Python processes
def test_python_dash_m_answers_help_and_a_missing_file_without_importing_torch(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "etf_hf", "train", "--help"], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "CONFIG.yaml" in result.stdout and "key=value" in result.stdout
    result = run_python(f"""
import sys
from etf_hf.app.cli import main
status = main(["train", {str(tmp_path / 'nope.yaml')!r}])
print(status, sorted({{"torch", "transformers"}} & set(sys.modules)))
""")
    assert result.stdout.split() == ["2", "[]"], result.stdout + result.stderr
    assert "nope.yaml' not found" in result.stderr


def test_a_bad_training_value_stops_before_any_model_data_or_run_folder(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    assert cli.main(["train", *TINY, "training.learning_rate=-0.001", f"output_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert "Invalid learning rate: -0.001" in err and "Traceback" not in err and "=== mode" not in err
    assert not run_dir.exists()


def test_yaml_values_are_typed_as_training_arguments_parses_them() -> None:
    raw, name = load_config(None)
    spec = validate(apply_overrides(raw, ["training.max_steps=3", "training.learning_rate='2e-3'",
                                          "training.disable_tqdm=true", "training.report_to=[]"]), name)
    assert spec.training["max_steps"] == 3 and spec.training["learning_rate"] == 2e-3
    assert spec.training["disable_tqdm"] is True and spec.training["report_to"] == []


def test_fewer_steps_than_logging_steps_says_so_and_writes_no_empty_plot(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """And the log's mode header says a control is a control."""
    run_dir = tmp_path / "run"
    assert cli.main(["train", *TINY, "training.max_steps=2", "training.logging_steps=5", "--only", "control-gaussian",
                     f"output_dir={run_dir}"]) == 0
    out = capsys.readouterr().out
    assert "=== mode 'control-gaussian' (control: gaussian, not an ETF)" in out
    assert ("mode 'control-gaussian' logged no training loss: it ran 2 optimizer steps, fewer than "
            "logging_steps=5") in out
    assert "no training loss logged by control-gaussian" in out and "so no loss plot" in out
    assert not (run_dir / "training_loss.png").exists()
    assert json.loads((run_dir / "metrics.json").read_text())["plots"] == []
