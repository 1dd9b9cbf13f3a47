"""The one config loader (moe_emergence/config_loader.py): YAML files and their base: chains, dotted
overrides, typed dataclasses, nearest-key hints, and errors that name the dotted key and the file and line
where the key was written."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from moe_emergence import MoEConfig
from moe_emergence.config_loader import ConfigError, apply_overrides, build, closest, load, read_yaml
from moe_emergence.data import DataConfig, default_offline_config
from moe_emergence.training.config import RunConfig, load_config
from moe_emergence.yamlio import strict_load_lines

BASE = {"data": {"seq_len": 32, "domains": {"math": {"type": "mathgen"}, "prose": {"type": "pydoc"}}}}


def write(path, text: str):
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def test_malformed_yaml_gives_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1, 2\nlog: {}\n")
    with pytest.raises(ConfigError, match=r"malformed YAML at line \d+, column \d+"):
        read_yaml(bad)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["train.steps"])


def test_inheritance_merges_and_replace(tmp_path):
    (tmp_path / "parent.yaml").write_text(
        textwrap.dedent("""
        data: {seq_len: 32, domains: {a: {type: mathgen, num_problems: 3}, b: {type: pydoc}}}
        train: {steps: 10, batch_size: 4}
        """)
    )
    (tmp_path / "child.yaml").write_text("base: parent.yaml\ntrain: {steps: 20}\n")
    (tmp_path / "repl.yaml").write_text("base: parent.yaml\ndata: {_replace: true, seq_len: 16}\n")
    child = read_yaml(tmp_path / "child.yaml")
    assert child["train"] == {"steps": 20, "batch_size": 4}
    assert child["data"]["domains"]["a"]["num_problems"] == 3
    assert read_yaml(tmp_path / "repl.yaml")["data"] == {"seq_len": 16}
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        read_yaml(tmp_path / "loop.yaml")


def test_base_chain_cycle_through_two_files_is_refused(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\ntrain: {steps: 3}\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(
        ConfigError, match=r"a\.yaml: circular 'base:' inheritance through .*a\.yaml.*b\.yaml"
    ):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "c.yaml", "base: [a.yaml]\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: 'base' must be a file name, got \['a\.yaml'\]"):
        read_yaml(tmp_path / "c.yaml")


def test_unknown_training_key_in_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(BASE) + "train:\n  steps: 3\n  stpes: 4\n")
    line = path.read_text().splitlines().index("  stpes: 4") + 1
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path} line {line}: unknown key 'train.stpes'; did you mean 'steps'?")
    assert "Allowed keys: balance_scope, batch_size" in str(err.value)


def test_unknown_training_key_by_override_has_no_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(BASE))
    with pytest.raises(ConfigError) as err:
        load_config(path, ["model.moe.num_expert=3"])
    assert str(err.value).startswith("unknown key 'model.moe.num_expert'; did you mean 'num_experts'?")


def test_key_from_a_base_file_names_that_file(tmp_path):
    parent = write(
        tmp_path / "parent.yaml",
        """
        data: {seq_len: 32, domains: {math: {type: mathgen}, prose: {type: pydoc}}}
        optim:
          lr: -1
        """,
    )
    write(tmp_path / "child.yaml", "base: parent.yaml\ntrain: {steps: 5}\n")
    fixed = write(tmp_path / "fixed.yaml", "base: parent.yaml\noptim: {lr: 0.5}\ntrain: {steps: [5]}\n")
    expected = {
        "child.yaml": f"{parent.resolve()} line 3: optim.lr=-1.0 is invalid: a number > 0",
        "fixed.yaml": f"{fixed.resolve()} line 3: train.steps: expected int, got list [5]",
    }
    for name, message in expected.items():
        with pytest.raises(ConfigError) as err:
            load_config(tmp_path / name)
        assert str(err.value) == message


def test_an_overridden_key_does_not_point_at_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**BASE, "train": {"steps": 5}}))
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.steps=abc"])
    assert str(err.value) == "train.steps: expected int, got str 'abc'"
    with pytest.raises(ConfigError) as err:  # the file's data block replaced: its lines no longer apply
        load_config(path, ["data={seq_len: 1, domains: {math: {type: mathgen}}}"])
    assert str(err.value).startswith("data.seq_len=1 is invalid: an integer >= 2")


def test_unknown_data_key_with_hint_in_file_and_dict(tmp_path):
    data = default_offline_config().to_dict()
    data["domains"]["math"]["num_problem"] = 5
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump({"data": data}, sort_keys=False))
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if "num_problem:" in t)
    expected = "unknown key 'data.domains.math.num_problem'; did you mean 'num_problems'?"
    with pytest.raises(ConfigError) as err:
        load(DataConfig, path, section="data")
    assert str(err.value).startswith(f"{path} line {line}: {expected}")
    with pytest.raises(ConfigError) as err:
        DataConfig.from_dict(data)
    assert str(err.value).startswith(expected)


def test_section_overrides_and_missing_section(tmp_path):
    path = write(tmp_path / "data.yaml", "data: {seq_len: 32, domains: {math: {type: mathgen}}}\n")
    cfg = load(DataConfig, path, section="data", overrides=["seq_len=64", "data.domains.math.num_problems=7"])
    assert cfg.seq_len == 64 and cfg.domains["math"].num_problems == 7
    with pytest.raises(ConfigError, match=r"^unknown key 'data\.seq_lenn'; did you mean 'seq_len'"):
        load(DataConfig, path, section="data", overrides=["seq_lenn=64"])
    other = write(tmp_path / "train.yaml", "train: {steps: 3}\n")
    with pytest.raises(ConfigError, match=r"train\.yaml: expected a mapping with a 'data:' block"):
        load(DataConfig, other, section="data")


def test_override_of_a_missing_section():
    cfg = load(RunConfig, data=BASE, overrides=["eval.every=7", "model.moe.top_k=2"])
    assert cfg.eval.every == 7 and cfg.eval.split == "val" and cfg.model.moe.top_k == 2
    with pytest.raises(ConfigError, match=r"^unknown key 'optimizer'; did you mean 'optim'\?"):
        load(RunConfig, data=BASE, overrides=["optimizer.lr=0.1"])
    with pytest.raises(
        ConfigError, match=r"override 'train\.steps\.max=3': 'train\.steps' is 5, not a mapping"
    ):
        load(RunConfig, data=BASE, overrides=["train.steps=5", "train.steps.max=3"])


@dataclass
class Inner:
    ratio: float = 0.5
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str
    count: int = 1
    flag: bool = False
    sizes: list[int] | Literal["all"] = "all"
    inner: Inner = field(default_factory=Inner)
    table: dict[str, Inner] = field(default_factory=dict)
    limit: int | None = None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"count": 1}, "missing required key 'name' (str)"),
        ({"name": 3}, "name: expected str, got int 3"),
        ({"name": "x", "count": "3"}, "count: expected int, got str '3'"),
        ({"name": "x", "count": 1.5}, "count: expected int, got float 1.5"),
        ({"name": "x", "flag": 1}, "flag: expected bool, got int 1"),
        ({"name": "x", "inner": {"ratio": "abc"}}, "inner.ratio: expected float, got str 'abc'"),
        (
            {"name": "x", "inner": {"ratio": "1e999"}},
            "inner.ratio='1e999' is invalid: expected a finite number",
        ),
        ({"name": "x", "inner": {"mode": "c"}}, "inner.mode: 'c' is not allowed; choose one of 'a', 'b'"),
        ({"name": "x", "inner": 3}, "inner: expected a mapping for Inner, got int 3"),
        ({"name": "x", "table": {"t": {"ratoi": 1}}}, "unknown key 'table.t.ratoi'; did you mean 'ratio'?"),
        (
            {"name": "x", "sizes": [1, "2"]},
            "sizes: [1, '2'] matches none of Union[list[int], Literal['all']] (sizes[1]: expected int, got str '2'; "
            "sizes: [1, '2'] is not allowed; choose one of 'all')",
        ),
        ({"name": "x", "limit": "none"}, "limit: expected int, got str 'none'"),
        (
            {"name": "x", "zzz": 1},
            "unknown key 'zzz'; Allowed keys: count, flag, inner, limit, name, sizes, table",
        ),
    ],
)
def test_bad_types_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        build(Outer, data)
    assert str(err.value).startswith(message), str(err.value)


def test_types_that_are_converted():
    cfg = build(
        Outer, {"name": "x", "count": 2.0, "inner": {"ratio": "1e-3"}, "sizes": [1, 2], "limit": None}
    )
    assert cfg.count == 2 and isinstance(cfg.count, int) and cfg.inner.ratio == 1e-3 and cfg.sizes == [1, 2]
    assert build(Outer, {"name": "x", "inner": {"ratio": 1}}).inner.ratio == 1.0


def test_moe_config_from_dict_goes_through_the_loader():
    with pytest.raises(ConfigError, match=r"^num_experts: expected int, got str '4'"):
        MoEConfig.from_dict({"num_experts": "4"})
    with pytest.raises(ConfigError, match=r"^MoEConfig\.top_k=9 is invalid"):
        MoEConfig.from_dict({"top_k": 9})
    assert MoEConfig.from_dict({"noise_std": 0}).noise_std == 0.0


def test_closest_and_key_lines():
    assert closest("stdlb", ("hub", "files", "stdlib")) == "stdlib"
    assert closest("zzz", ("hub", "files")) is None
    data, lines = strict_load_lines("a: 1\nb:\n  c: [1, {d: 2}]\n  e: 3\n")
    assert data == {"a": 1, "b": {"c": [1, {"d": 2}], "e": 3}}
    assert lines == {("a",): 1, ("b",): 2, ("b", "c"): 3, ("b", "e"): 4}


def test_override_inside_a_null_section_is_refused():
    """configs/dense.yaml switches the MoE off (model.moe: null); setting a key inside it must not build a
    default MoE silently."""
    with pytest.raises(ConfigError, match="'model.moe' is null"):
        load_config("configs/dense.yaml", ["model.moe.top_k=2"])
    cfg = load_config("configs/dense.yaml", ["model.moe={top_k: 2, num_experts: 4}"])
    assert cfg.model.moe.top_k == 2 and cfg.model.moe.num_experts == 4


def test_yaml11_boolean_words_give_back_the_literal_they_spell(tmp_path):
    """``no`` / ``off`` / ``yes`` / ``on`` read as booleans by YAML 1.1: a Literal that allows the word gets it,
    from a file and from an override; a boolean where the Literal allows no such word stays refused."""
    path = write(tmp_path / "c.yaml", "train:\n  mixed_precision: no\n")
    assert load_config(str(path), [f"data={BASE['data']}"]).train.mixed_precision == "no"
    cfg = load_config(
        str(path), [f"data={BASE['data']}", "train.mixed_precision=NO", "train.cuda_graphs=none"]
    )
    assert cfg.train.mixed_precision == "no" and cfg.train.cuda_graphs == "none"
    for word in ("off", "false", "False"):
        assert (
            load_config(
                str(path), [f"data={BASE['data']}", f"train.mixed_precision={word}"]
            ).train.mixed_precision
            == "no"
        )

    @dataclass
    class Switch:
        mode: Literal["on", "auto"] = "auto"
        both: Literal["on", "yes"] = "on"

    assert build(Switch, {"mode": True}).mode == "on"
    with pytest.raises(
        ConfigError,
        match=r"^mode: no/off/false \(YAML reads them as False\) is not allowed; choose one of 'on', 'auto'",
    ):
        build(Switch, {"mode": False})
    with pytest.raises(ConfigError, match=r"^both: yes/on/true \(YAML reads them as True\) is not allowed"):
        build(Switch, {"both": True})  # two words: which one is unknown
