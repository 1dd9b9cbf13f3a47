"""scripts/bench_host.py on the CPU: its refusals are one ``error:`` line and exit status 2, before any GPU work.
The GPU measurement itself is not run here."""

import json
from unittest import mock

import pytest
import torch
from _scripts import script_importing_scripts


@pytest.fixture(scope="module")
def bh():
    with script_importing_scripts("bench_host") as module:
        yield module


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--tokens", "1000"], "--tokens 1000: a multiple of 512"),
        (["--reps", "0"], "--reps: 0 is not an integer >= 1"),
        (["--top-k", "3"], "--top-k"),
        (["--top-k", "abc"], "invalid choice: 'abc'"),
        (["--rounds", "0"], "--rounds: 0 is not an integer >= 1"),
        (["--rounds", "abc"], "--rounds: 'abc' is not an integer >= 1"),
        (
            ["--json", "/no/such/folder/x.json"],
            "--json /no/such/folder/x.json: a JSON file in an existing folder",
        ),
        (["--json", "/proc/version"], "--json /proc/version: not writable"),  # refused to root too
        (["--json", "/proc/new.json"], "--json /proc/new.json: not writable"),
        (
            ["--json", "/dev/null"],
            "--json /dev/null: a JSON file, not a device",
        ),  # renamed over, it was replaced
        ([], "needs a CUDA device"),
    ],
)
def test_refusals_are_one_error_line(bh, capsys, argv, says):
    if not argv and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(SystemExit) as exit_:
        bh.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and says in err[0], err


def test_every_part_is_measured_in_each_round_the_order_rotating(bh):
    """bench_moe.interleaved, which bench_host's parts and bench_moe's e2e variants share: one value per name a
    round, each name first once in len(names) rounds; the ratio is the median of same-round ratios."""
    calls = []
    drift = iter(range(1, 100))  # the machine slows down round by round

    def measure(name: str) -> float:
        calls.append(name)
        return {"dense": 10.0, "a": 20.0, "b": 15.0}[name] * next(drift)

    values = bh.interleaved(["dense", "a", "b"], 3, measure)
    assert calls == ["dense", "a", "b", "a", "b", "dense", "b", "dense", "a"]
    assert {n: len(v) for n, v in values.items()} == {"dense": 3, "a": 3, "b": 3}
    assert values["a"] == [40.0, 80.0, 180.0] and values["dense"] == [10.0, 60.0, 80.0]
    # same-round ratios 4.0, 1.33, 2.25 (drift moves each round's numbers, not the pairing)
    assert bh.median_ratio(values["a"], values["dense"]) == 2.25


def test_rows_of_each_top_k_are_written_before_the_next_is_measured(bh, monkeypatch, tmp_path):
    """A failure while K = 2 is measured (e.g. "the host waited on the device") keeps K = 1's rows in --json."""
    parts = ["dense", "dense autocast", "triton", "wrapper graphed"]
    monkeypatch.setattr(bh.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bh.torch.cuda, "get_device_name", lambda: "fake GPU")
    monkeypatch.setattr(bh.torch, "Generator", lambda device=None: mock.Mock())
    monkeypatch.setattr(bh.triton_launch, "CACHED", False)

    def layer_parts(T, K, gen):
        if K == 2:
            raise RuntimeError("the GPU's sleep ended before the work was issued")
        return {name: (lambda name=name: name) for name in parts}

    monkeypatch.setattr(bh, "layer_parts", layer_parts)
    monkeypatch.setattr(bh, "host_us", lambda fn, reps: {"dense": 100.0}.get(fn(), 150.0))
    out = tmp_path / "host.json"
    with pytest.raises(RuntimeError, match="sleep ended"):
        bh.main(["--top-k", "1", "2", "1", "--rounds", "3", "--json", str(out)])
    written = json.loads(out.read_text())
    assert written["top_k"] == [1, 2] and written["rounds"] == 3
    rows = written["rows"]
    assert [r["part"] for r in rows] == parts and {r["K"] for r in rows} == {1}
    assert rows[2] == dict(K=1, part="triton", host_us=150.0, dense_ratio=1.5, round_us=[150.0] * 3)
