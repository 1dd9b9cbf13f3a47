import dataclasses

import pytest

from moe_emergence.config_loader import apply_overrides
from moe_emergence.data import (
    DataConfig,
    SourceConfig,
    default_offline_config,
    local_study_config,
)
from moe_emergence.data.config import saved_data_block


def test_round_trip_and_helpers():
    cfg = default_offline_config()
    assert list(cfg.domains) == ["code", "math", "prose"]
    assert [s.type for s in cfg.domains.values()] == ["stdlib", "mathgen", "pydoc"]
    again = DataConfig.from_dict(cfg.to_dict())
    assert again == cfg
    study = local_study_config()
    assert study.domains["math"].paths == ["../shared/data/math/gsm8k_train.jsonl"]
    assert study.domains["prose"].type == "files"


def test_unknown_keys_name_key_and_suggest():
    d = default_offline_config().to_dict()
    d["seq_lne"] = 64
    with pytest.raises(ValueError, match=r"unknown key 'data\.seq_lne'; did you mean 'seq_len'"):
        DataConfig.from_dict(d)
    d = default_offline_config().to_dict()
    d["domains"]["math"]["num_problem"] = 5
    with pytest.raises(
        ValueError, match=r"unknown key 'data\.domains\.math\.num_problem'; did you mean 'num_problems'"
    ):
        DataConfig.from_dict(d)


def test_unknown_source_type_names_value():
    with pytest.raises(ValueError, match=r"type='stdlb'.*did you mean 'stdlib'"):
        SourceConfig(type="stdlb")
    with pytest.raises(ValueError, match="unknown source type"):
        DataConfig.from_dict({"domains": {"code": {"type": "github"}}})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seq_len": 1}, "seq_len"),
        ({"eval_fraction": 1.0}, "eval_fraction"),
        ({"val_fraction": -0.1}, r"val_fraction=-0.1 is invalid: a number in \[0, 1 - eval_fraction\)"),
        ({"eval_fraction": 0.5, "val_fraction": 0.5}, r"val_fraction=0.5 is invalid.*\[0, 0.5\)"),
        ({"mixing": "equal"}, "mixing"),
        ({"mixing": "weighted", "weights": {"code": 1.0}}, "one weight per domain"),
        ({"mixing": "weighted", "weights": {"code": 1.0, "math": 0.0, "prose": 1.0}}, "> 0"),
        ({"weights": {"code": 1.0, "math": 1.0, "prose": 1.0}}, "only used with mixing=weighted"),
        ({"domains": {}}, "non-empty"),
    ],
)
def test_data_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        default_offline_config(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"type": "hub"}, "needs a dataset name"),
        ({"type": "files"}, "at least one path"),
        ({"type": "files", "paths": ["a.txt"], "split_mode": "lines"}, "split_mode"),
        ({"type": "mathgen", "templates": ["calculus"]}, "calculus"),
        ({"type": "stdlib", "min_chars": 10, "max_chars": 5}, "max_chars"),
        ({"type": "stdlib", "max_docs": 0}, "max_docs"),
        (
            {"type": "files", "paths": ["a.txt"], "strip_gutenberg": "yes"},
            "strip_gutenberg='yes'.*true or false",
        ),
    ],
)
def test_source_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SourceConfig(**kwargs)


def test_apply_overrides_nested_and_typed():
    d = default_offline_config().to_dict()
    out = apply_overrides(
        d,
        ["data.seq_len=64", "domains.math.num_problems=500", "cross_domains=true", "cache_dir=null"],
        section="data",
    )
    cfg = DataConfig.from_dict(out)
    assert cfg.seq_len == 64 and cfg.domains["math"].num_problems == 500
    assert cfg.cross_domains is True and cfg.cache_dir is None
    assert d["seq_len"] == 128, "the input mapping is not modified"
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(d, ["seq_len"], section="data")


def test_source_fields_that_do_not_apply_are_refused_and_not_saved():
    """A stdlib source does not read num_problems: setting it is an error naming the types that do, and the
    saved config lists only the fields each source reads (configs saved with every field still compare)."""
    from moe_emergence.data.config import SourceConfig, without_inapplicable

    with pytest.raises(
        ValueError, match=r"num_problems=5 .* does not apply to a 'stdlib' source \(only to \['mathgen'\]\)"
    ):
        SourceConfig(type="stdlib", num_problems=5)
    src = SourceConfig(type="mathgen", num_problems=5)
    assert set(src.to_dict()) == {
        "type",
        "min_chars",
        "max_chars",
        "max_docs",
        "max_total_chars",
        "num_problems",
        "templates",
    }
    full = dataclasses.asdict(SourceConfig(type="stdlib"))
    assert (
        without_inapplicable({"domains": {"code": full}})["domains"]["code"]
        == SourceConfig(type="stdlib").to_dict()
    )


def test_a_saved_data_block_rebuilds_the_data_it_was_trained_on():
    """Run folders saved before the val split and Gutenberg stripping existed lack those keys: read back, they
    get the values then in effect (no val split, text not stripped), not today's defaults."""
    old = {"domains": {"prose": {"type": "files", "paths": ["a.txt"]}, "math": {"type": "mathgen"}}}
    cfg = DataConfig.from_dict(saved_data_block(old))
    assert cfg.val_fraction == 0.0 and cfg.domains["prose"].strip_gutenberg is False
    new = default_offline_config(val_fraction=0.2).to_dict()
    new["domains"]["prose"] = {"type": "files", "paths": ["a.txt"], "strip_gutenberg": True}
    assert saved_data_block(new) == new
    fresh = DataConfig.from_dict(old)
    assert fresh.val_fraction == 0.1 and fresh.domains["prose"].strip_gutenberg is True  # the defaults now
