"""What a finished run leaves to look at (``training/summary.py``): summary.md with the numbers of
metrics.jsonl, the PNGs in plots/, the closing lines on the console; nothing for a run that only paused."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import test_training_run
from test_training_run import make_cfg

from moe_emergence.errors import ConfigError
from moe_emergence.telemetry import read_metrics
from moe_emergence.training import loop
from moe_emergence.training.runfiles import MARKER, check_entry_types, foreign_entries
from moe_emergence.training.trainer import train

DOMAINS = ("code", "math", "prose")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def data_cache(tmp_path_factory):
    """One corpus cache for the module (``make_cfg`` reads it from test_training_run)."""
    test_training_run.CACHE = tmp_path_factory.mktemp("data_cache")


def last_eval(run: Path, split: str = "val") -> dict:
    return [r for r in read_metrics(run / "metrics.jsonl") if f"{split}/lm_loss" in r][-1]


def plots(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "plots").iterdir())


def assert_loss_part(run: Path, text: str, ev: dict, split: str = "val") -> None:
    """The split's final table holds its last eval record's loss and perplexity of every domain and the
    fingerprint of its blocks."""
    assert f"## Final {split} loss (step {ev['step']})" in text
    assert f"blocks `{ev[f'{split}/blocks_fingerprint']}`." in text
    for d in DOMAINS:
        assert f"| {d} | {ev[f'{split}/loss_{d}']:.4f} | {ev[f'{split}/ppl_{d}']:.2f} |" in text, d
    assert f"| all tokens | {ev[f'{split}/lm_loss']:.4f} |" in text
    assert "![loss_by_domain](plots/loss_by_domain.png)" in text
    assert re.search(r"python \S*scripts/analyze\.py \S+ --out reports/\S+", text)
    assert "nbconvert --to notebook --execute" in text and "specialization.ipynb" in text
    for name in plots(run):
        assert (run / "plots" / name).read_bytes().startswith(PNG), name
    assert foreign_entries(run) == []  # --overwrite may replace everything the run wrote


def test_finished_moe_run_leaves_summary_plots_and_closing_lines(tmp_path, capsys):
    res = train(make_cfg(tmp_path, "moe", "eval.final_split=eval"))
    run, ev, test = res.run_dir, last_eval(res.run_dir), last_eval(res.run_dir, "eval")
    text = (run / "summary.md").read_text()
    assert text.startswith("# Run summary: moe\n") and "Finished at step 6 of 6" in text
    for row in (
        "| MoE layers | 0, 1 |",
        "| experts, top_k | 4, top-1 (token_choice) |",
        "| upcycled at step | 2",
    ):
        assert row in text, row
    assert_loss_part(run, text, ev)
    assert_loss_part(run, text, test, "eval")  # eval.final_split: the test split, once at the end
    assert test["step"] == 6 and text.index("## Final val loss") < text.index("## Final eval loss")
    for L in (0, 1):  # the routing of the last eval record of eval.split, per layer
        shares = " ".join(f"{ev[f'val_router/layer{L}/expert{e}_frac']:.2f}" for e in range(4))
        nmi = ev[f"val_router/layer{L}/domain_nmi"]
        assert f"| {L} | `val_router/` step 6 | {shares} |" in text and f"| {nmi:.3f} |" in text
    expected = [f"{kind}_layer{L}.png" for kind in ("domain_expert", "expert_share") for L in (0, 1)]
    assert plots(run) == sorted([*expected, "loss_by_domain.png"])
    out = capsys.readouterr().out
    tokens = int([r for r in read_metrics(run / "metrics.jsonl") if "train/tokens" in r][-1]["train/tokens"])
    assert f"| tokens seen | {tokens:,} |" in text
    assert f"finished at step 6 ({tokens:,} tokens); summary: {run / 'summary.md'}" in out
    for split, record in (("val", ev), ("eval", test)):
        losses = ", ".join(f"{d} {record[f'{split}/loss_{d}']:.4f}" for d in DOMAINS)
        assert f"final {split} loss (step 6): {losses}; all tokens {record[f'{split}/lm_loss']:.4f}" in out
    assert re.search(
        rf"next: \S*python\S* \S*scripts/analyze\.py {re.escape(str(run))} --out reports/moe", out
    )


def test_dense_run_summary_has_the_loss_part_only(tmp_path):
    res = train(make_cfg(tmp_path, "dense", "model.moe=null", "train.steps=3"))
    text = (res.run_dir / "summary.md").read_text()
    assert "| MoE | none (dense control" in text and "## Routing" not in text
    assert_loss_part(res.run_dir, text, last_eval(res.run_dir))
    assert plots(res.run_dir) == ["loss_by_domain.png"]


def test_a_paused_run_leaves_no_summary_until_it_finishes(tmp_path, capsys):
    part = train(make_cfg(tmp_path, "part", "train.stop_after=3"))
    assert part.stopped == "stop_after"
    assert not (part.run_dir / "summary.md").exists() and not (part.run_dir / "plots").exists()
    assert "final val loss" not in capsys.readouterr().out
    done = train(make_cfg(tmp_path, "part"), resume="auto")
    text = (done.run_dir / "summary.md").read_text()
    assert_loss_part(done.run_dir, text, last_eval(done.run_dir))
    assert "domain_expert_layer1.png" in plots(done.run_dir)  # the resumed run's last eval


def test_a_summary_that_cannot_be_written_is_a_warning(tmp_path, capsys, monkeypatch):
    def disk_full(facts, print_fn):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loop, "write_summary", disk_full)
    res = train(make_cfg(tmp_path, "full", "model.moe=null", "train.steps=1"))
    assert res.stopped is None and (res.run_dir / "final").is_dir()
    assert "warning: the run summary was not written in" in capsys.readouterr().out


def test_overwrite_knows_the_summary_entries(tmp_path):
    run = tmp_path / "run"
    (run / "plots").mkdir(parents=True)
    (run / MARKER).write_text("{}")
    (run / "summary.md").write_text("# Run summary")
    for name in ("loss_by_domain.png", "expert_share_layer3.png", "domain_expert_layer11.png"):
        (run / "plots" / name).write_bytes(PNG)
    assert foreign_entries(run) == []
    (run / "plots" / "notes.txt").write_text("mine")
    (run / "plots" / "mine.png").write_bytes(PNG)
    (run / "plots" / "loss_by_domain.png").unlink()
    (run / "plots" / "loss_by_domain.png").symlink_to(run / "plots" / "mine.png")
    assert foreign_entries(run) == ["plots/loss_by_domain.png", "plots/mine.png", "plots/notes.txt"]
    (run / "summary.md").unlink()
    os.mkfifo(run / "summary.md")
    with pytest.raises(ConfigError, match=r"summary\.md is not a regular file"):
        check_entry_types(run)
