"""ETFConfig validation: every bad value is refused at construction with the field named."""
from __future__ import annotations

import json

import pytest

from etf_hf import FORMAT_VERSION, ETFConfig


def test_defaults_and_json_round_trip() -> None:
    config = ETFConfig(layers=[3, 1, 3], basis="nearest", gain=0.5)
    assert config.layers == [1, 3]
    data = json.loads(json.dumps(config.to_dict()))
    assert data["format_version"] == FORMAT_VERSION
    assert ETFConfig.from_dict(data) == config


@pytest.mark.parametrize("kwargs,field", [
    (dict(layers="most"), "layers"),
    (dict(layers=7), "layers"),
    (dict(head=1), "head"),
    (dict(head_basis="orthogonal"), "head_basis"),
    (dict(placement="auto"), "placement"),
    (dict(layers="last:0"), "layers"),
    (dict(layers=[]), "layers"),
    (dict(layers=[-1]), "layers"),
    (dict(layers=[1.5]), "layers"),
    (dict(projections="middle"), "projections"),
    (dict(basis="hadamard"), "basis"),
    (dict(seed=-1), "seed"),
    (dict(seed="0"), "seed"),
    (dict(gain=0), "gain"),
    (dict(gain="big"), "gain"),
    (dict(gain=-1.0), "gain"),
    (dict(gain=float("inf")), "gain"),
    (dict(gain=float("nan")), "gain"),
    (dict(gain=1e300), "gain"),
    (dict(gain=10**400), "gain"),
    (dict(trainable_gain="yes"), "trainable_gain"),
    (dict(target_modules="mlp"), "target_modules"),
    (dict(target_modules=["("]), "target_modules"),
    (dict(storage="zip"), "storage"),
])
def test_invalid_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"ETFConfig.{field}|{field}"):
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


def test_version_2_fields_round_trip_and_placement_is_only_a_record() -> None:
    config = ETFConfig(layers=[], head=True, head_basis="canonical", placement={"rule": "auto", "ncc": [0.5, 0.95]})
    data = json.loads(json.dumps(config.to_dict()))
    assert data["format_version"] == FORMAT_VERSION == 2
    assert ETFConfig.from_dict(data) == config and ETFConfig.from_dict(data).placement == config.placement
    assert ETFConfig(layers=[1], placement={"rule": "x"}) == ETFConfig(layers=[1])  # a record, not a setting
    assert ETFConfig().layers is None and ETFConfig(layers="auto").layers == "auto"


def version_1_dict() -> dict:
    """What etf_hf with format version 1 wrote: no head, head_basis or placement field."""
    return {"layers": [1, 3], "projections": "both", "basis": "nearest", "seed": 0, "gain": "match",
            "trainable_gain": True, "target_modules": None, "storage": "compact", "format_version": 1}


def test_version_1_config_loads_with_the_new_fields_defaulted() -> None:
    config = ETFConfig.from_dict(version_1_dict())
    assert config == ETFConfig(layers=[1, 3], basis="nearest")
    assert not config.head and config.head_basis is None and config.placement is None
    assert config.format_version == FORMAT_VERSION  # read into this version, written back as it
    with pytest.raises(ValueError, match=r"format_version 1\) has unknown field\(s\) \['head'\]"):
        ETFConfig.from_dict({**version_1_dict(), "head": True})
    with pytest.raises(ValueError, match=r"missing field\(s\) \['seed'\]"):
        ETFConfig.from_dict({k: v for k, v in version_1_dict().items() if k != "seed"})
