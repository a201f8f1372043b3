"""ETFConfig validation: every bad value is refused at construction with the field named."""
from __future__ import annotations

import json
import re

import pytest

from etf_hf import FORMAT_VERSION, ETFConfig


def test_defaults_and_json_round_trip() -> None:
    config = ETFConfig(layers=[3, 1, 3], basis="nearest", gain=0.5)
    assert config.layers == [1, 3]
    data = json.loads(json.dumps(config.to_dict()))
    assert data["format_version"] == FORMAT_VERSION
    assert ETFConfig.from_dict(data) == config


@pytest.mark.parametrize("kwargs,message", [
    # each message: the field and the bad value, what is wrong, and what to write instead
    (dict(layers="most"), "ETFConfig.layers='most': use 'all', 'last:N', a list of block indices, 'auto', a mapping "
                          "of stack -> layers (encoder-decoder models), or leave it unset for the default"),
    (dict(layers=7), "ETFConfig.layers must be 'all', 'auto', 'last:N', a list of ints, a mapping of stack -> "
                     "layers, or None, got int"),
    (dict(head=1), "ETFConfig.head=1: must be true or false"),
    (dict(head_basis="orthogonal"), "ETFConfig.head_basis='orthogonal' without head=True: set head=True"),
    (dict(placement="auto"), "ETFConfig.placement must be a JSON object or null"),
    (dict(layers="last:0"), "ETFConfig.layers='last:0' selects nothing: use 'last:N' with N >= 1"),
    (dict(layers=[]), "ETFConfig.layers=[] fixes no FFN block: that only makes sense with head=True"),
    (dict(layers=[-1]), "ETFConfig.layers=[-1]: block indices are 0-based and non-negative"),
    (dict(layers=[1.5]), "ETFConfig.layers=[1.5]: a list of layers must hold block indices (ints)"),
    (dict(projections="middle"), "ETFConfig.projections='middle': choose one of up, down, both"),
    (dict(basis="hadamard"), "ETFConfig.basis='hadamard' is unknown: choose an ETF basis (canonical, orthogonal, "
                             "nearest, structured) or a control (gaussian, zero, frozen)"),
    (dict(seed=-1), "ETFConfig.seed=-1: must be a non-negative int"),
    (dict(seed="0"), "ETFConfig.seed='0': must be a non-negative int"),
    (dict(gain=0), "ETFConfig.gain=0 is not positive: use 'match' (the replaced weight's norm) or a finite positive number such as 1.0"),
    (dict(gain="big"), "ETFConfig.gain='big': use 'match' or a positive number (1.0 gives unit-norm frame vectors)"),
    (dict(gain=-1.0), "ETFConfig.gain=-1.0 is not positive: use 'match' (the replaced weight's norm) or a finite positive number such as 1.0"),
    (dict(gain=float("inf")), "ETFConfig.gain=inf is not finite: use 'match' (the replaced weight's norm) or a finite positive number such as 1.0"),
    (dict(gain=float("nan")), "ETFConfig.gain=nan is not finite: use 'match' (the replaced weight's norm) or a finite positive number such as 1.0"),
    (dict(gain=1e300), "ETFConfig.gain=1e+300 does not fit in float32, the dtype gains are kept in (largest 3.4e+38)"),
    (dict(gain=10**400), f"ETFConfig.gain={10**400} does not fit in float32"),
    (dict(trainable_gain="yes"), "ETFConfig.trainable_gain='yes': must be true or false"),
    (dict(target_modules="mlp"), "ETFConfig.target_modules must be a list of regular expressions (strings)"),
    (dict(target_modules=["("]), "ETFConfig.target_modules: '(' is not a valid regex"),
    (dict(storage="zip"), "ETFConfig.storage='zip': choose one of compact, dense"),
])
def test_invalid_values_name_the_field_and_the_fix(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        ETFConfig(**kwargs)


@pytest.mark.parametrize("gain, problem", [(float("inf"), "is not finite"), (float("nan"), "is not finite"),
                                           (1e300, "does not fit in float32"), (-2.0, "is not positive")])
def test_a_gain_no_gain_tensor_can_hold_is_refused_with_the_fix(gain: float, problem: str) -> None:
    with pytest.raises(ValueError, match=f"ETFConfig.gain=.* {problem}.*use 'match'"):
        ETFConfig(gain=gain)


def test_the_largest_float32_gain_is_accepted() -> None:
    assert ETFConfig(gain=3e38).gain == 3e38


def test_unknown_basis_lists_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="canonical, orthogonal, nearest"):
        ETFConfig(basis="hadamard")


def test_from_dict_is_strict() -> None:
    data = ETFConfig().to_dict()
    with pytest.raises(ValueError, match=r"missing field\(s\) \['seed'\]"):
        ETFConfig.from_dict({k: v for k, v in data.items() if k != "seed"})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['colour'\]"):
        ETFConfig.from_dict({**data, "colour": "red"})
    with pytest.raises(ValueError, match="JSON object"):
        ETFConfig.from_dict(["all"])


def test_newer_format_names_both_versions() -> None:
    data = {**ETFConfig().to_dict(), "format_version": FORMAT_VERSION + 1, "future_field": 1}
    with pytest.raises(ValueError, match=f"format_version {FORMAT_VERSION + 1}.*up to version {FORMAT_VERSION}"):
        ETFConfig.from_dict(data)


MODULE = {"path": "h.0.mlp.c_fc", "root": "base_model", "role": "up", "layout": "conv1d", "seed_key": "0:up:c_fc"}


def test_version_2_to_4_fields_round_trip_and_placement_and_modules_are_only_records() -> None:
    config = ETFConfig(layers=[], head=True, head_basis="canonical", recompute=False,
                       placement={"rule": "auto", "ncc": [0.5, 0.95]}, modules=[MODULE])
    data = json.loads(json.dumps(config.to_dict()))
    assert data["format_version"] == FORMAT_VERSION == 4 and data["recompute"] is False
    assert data["modules"] == [MODULE]
    assert ETFConfig.from_dict(data) == config and ETFConfig.from_dict(data).placement == config.placement
    assert ETFConfig.from_dict(data).modules == [MODULE]
    assert ETFConfig(layers=[1], placement={"rule": "x"}) == ETFConfig(layers=[1])  # a record, not a setting
    assert ETFConfig(layers=[1], modules=[MODULE]) == ETFConfig(layers=[1])
    assert ETFConfig().layers is None and ETFConfig(layers="auto").layers == "auto"


def version_1_dict() -> dict:
    """What etf_hf with format version 1 wrote: no head, head_basis or placement field."""
    return {"layers": [1, 3], "projections": "both", "basis": "nearest", "seed": 0, "gain": "match",
            "trainable_gain": True, "target_modules": None, "storage": "compact", "format_version": 1}


@pytest.mark.parametrize("modules", [{"path": "x"}, [{**MODULE, "seed_key": 3}], [{**MODULE, "extra": "1"}], "h.0"])
def test_a_malformed_modules_record_is_refused(modules) -> None:
    with pytest.raises(ValueError, match=r"ETFConfig.modules must be a list of \{path, root, role, layout, seed_key\}"):
        ETFConfig(layers=[0], modules=modules)


def test_version_3_config_loads_without_modules_and_refuses_them() -> None:
    """Format 4 added ``modules``; a version-3 config.etf lacks it (loading computes it from the model)."""
    data = {k: v for k, v in ETFConfig(layers=[0]).to_dict().items() if k != "modules"}
    config = ETFConfig.from_dict({**data, "format_version": 3})
    assert config.modules is None and config.format_version == 4 and config == ETFConfig(layers=[0])
    with pytest.raises(ValueError, match=r"format_version 3\) has unknown field\(s\) \['modules'\]"):
        ETFConfig.from_dict({**data, "format_version": 3, "modules": [MODULE]})


def test_an_older_layers_none_with_target_modules_is_read_as_all() -> None:
    """Releases before format 2 recorded layers=None when target_modules matched modules outside numbered
    blocks (all of them); None now means only "let etf_hf.resolve choose", so it is read as "all"."""
    config = ETFConfig.from_dict({**version_1_dict(), "layers": None, "target_modules": ["score"]})
    assert config.layers == "all"
    assert ETFConfig.from_dict({**version_1_dict(), "layers": None}).layers is None  # a request's default, not a record


def test_version_2_config_loads_with_recompute_defaulted() -> None:
    """Format 3 added ``recompute``; a version-2 config.etf (written before the fused FFN) lacks it."""
    data = {k: v for k, v in ETFConfig(layers=[0], basis="structured").to_dict().items()
            if k not in ("recompute", "modules")}
    config = ETFConfig.from_dict({**data, "format_version": 2})
    assert config.recompute is None and config == ETFConfig(layers=[0], basis="structured")
    with pytest.raises(ValueError, match=r"format_version 2\) has unknown field\(s\) \['recompute'\]"):
        ETFConfig.from_dict({**data, "format_version": 2, "recompute": True})
    with pytest.raises(ValueError, match="ETFConfig.recompute=1"):
        ETFConfig(recompute=1)


def test_version_1_config_loads_with_the_new_fields_defaulted() -> None:
    config = ETFConfig.from_dict(version_1_dict())
    assert config == ETFConfig(layers=[1, 3], basis="nearest")
    assert not config.head and config.head_basis is None and config.placement is None
    assert config.format_version == FORMAT_VERSION  # read into this version, written back as it
    with pytest.raises(ValueError, match=r"format_version 1\) has unknown field\(s\) \['head'\]"):
        ETFConfig.from_dict({**version_1_dict(), "head": True})
    with pytest.raises(ValueError, match=r"missing field\(s\) \['seed'\]"):
        ETFConfig.from_dict({k: v for k, v in version_1_dict().items() if k != "seed"})
