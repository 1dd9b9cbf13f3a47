"""scripts/bench_peers.py on the CPU: the peers that run here against eager_experts, ScatterMoE's weight layout,
the JSON schema and the refusals (no CUDA, no ScatterMoE). The GPU timing itself is not run here."""

import json
import os
import sys

import pytest
import torch
from _scripts import script_importing_scripts

from moe_emergence.experts import eager_experts


@pytest.fixture(scope="module")
def bp():
    with script_importing_scripts("bench_peers") as module:
        yield module


@pytest.fixture(scope="module")
def peers(bp):
    """scripts/peer_impls.py, the peers' module (imported by bench_peers)."""
    return sys.modules["peer_impls"]


@pytest.fixture(scope="module")
def pr(bp):
    """scripts/peer_report.py, the report's module (imported by bench_peers)."""
    return sys.modules["peer_report"]


def _grads(fn, base, idx, gy):
    leaves = [t.clone().requires_grad_() for t in base]
    y = fn(*leaves[:5], idx, leaves[5], "gelu_pytorch_tanh")
    return [y, *torch.autograd.grad(y, leaves, gy)]


@pytest.mark.parametrize("name", ["hf_grouped_mm", "naive"])
@pytest.mark.parametrize("K", [1, 3])
def test_cpu_peers_match_eager(bp, peers, name, K):
    """Forward and all six gradients, float32, odd T and E, one expert without tokens (torch._grouped_mm runs on
    the CPU in this torch)."""
    gen = torch.Generator().manual_seed(0)
    T, E, D, F = 37, 5, 12, 20  # D, F multiples of 4: 16-byte float32 rows, as torch._grouped_mm needs
    idx = torch.stack([torch.randperm(E - 1, generator=gen)[:K] for _ in range(T)])  # expert E-1: no token
    wts = torch.rand(T, K, generator=gen) + 0.1
    base = [torch.randn(T, D, generator=gen), torch.randn(E, D, F, generator=gen) * 0.3]
    base += [torch.randn(E, F, generator=gen), torch.randn(E, F, D, generator=gen) * 0.3]
    base += [torch.randn(E, D, generator=gen), wts]
    gy = torch.randn(T, D, generator=gen)
    fn = {"hf_grouped_mm": peers.hf_grouped_mm_experts, "naive": bp.naive_experts}[name]
    for got, ref in zip(_grads(fn, base, idx, gy), _grads(eager_experts, base, idx, gy), strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_scattermoe_layout_round_trips(peers):
    gen = torch.Generator().manual_seed(1)
    E, D, F = 3, 8, 12
    ours = [torch.randn(E, D, F, generator=gen), torch.randn(E, F, generator=gen)]
    ours += [torch.randn(E, F, D, generator=gen), torch.randn(E, D, generator=gen)]
    theirs = peers.to_scattermoe(*ours)
    assert [tuple(t.shape) for t in theirs] == [(E, F, D), (E, F), (E, D, F), (E, D)]  # weight [E, out, in]
    assert all(t.is_contiguous() for t in theirs)
    for a, b in zip(peers.from_scattermoe(*theirs), ours, strict=True):
        assert torch.equal(a, b)
    x = torch.randn(4, D, generator=gen)  # ParallelExperts computes x @ weight[e].T (+ bias)
    torch.testing.assert_close(torch.nn.functional.linear(x, theirs[0][1]), x @ ours[0][1])


class _FakeScatterMoE:
    """ScatterMoE's ``flatten_sort_count`` / ``parallel_linear`` semantics in plain torch (its kernels are Triton,
    GPU only): row i of the expert-sorted order belongs to expert ``expert_A[i]`` and to flat assignment
    ``scattered_A[i]`` (token ``scattered_A[i] // k``); grouped input/output rows are in sorted order, scattered
    ones in assignment order; ``gates`` [T, K] combine each token's K output rows."""

    @staticmethod
    def flatten_sort_count(expert_idxs, num_experts):
        expert_A, scattered_A = torch.sort(expert_idxs.flatten())
        return expert_A, scattered_A, torch.bincount(expert_idxs.flatten(), minlength=num_experts).cumsum(-1)

    @staticmethod
    def parallel_linear(x, w_EIO, k, expert_A, scattered_A, offsets_E, expert_biases=None, gates=None,
                        grouped_in=False, grouped_out=False):  # fmt: skip
        rows = x if grouped_in else x[scattered_A // k]
        out = torch.einsum("ai,aio->ao", rows, w_EIO[expert_A]) + expert_biases[expert_A]
        if not grouped_out:
            out = torch.empty_like(out).index_copy(0, scattered_A, out)
        if gates is not None:
            out = (gates.unsqueeze(1) @ out.view(gates.shape[0], gates.shape[1], -1)).squeeze(1)
        return out


@pytest.mark.parametrize("histc", [False, True])
def test_scattermoe_call_matches_eager(peers, histc):
    """Our call of ScatterMoE's API (layout, k, grouped flags, gates) on a plain-torch stand-in of its ops."""
    gen = torch.Generator().manual_seed(2)
    T, E, K, D, F = 23, 5, 2, 8, 12
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    wts = torch.rand(T, K, generator=gen)
    p = [torch.randn(E, D, F, generator=gen), torch.randn(E, F, generator=gen)]
    p += [torch.randn(E, F, D, generator=gen), torch.randn(E, D, generator=gen)]
    x = torch.randn(T, D, generator=gen)
    fn = peers.scattermoe_experts(_FakeScatterMoE, histc=histc)
    got = fn(x, *peers.to_scattermoe(*p), idx, wts, "gelu_pytorch_tanh")
    torch.testing.assert_close(got, eager_experts(x, *p, idx, wts, "gelu_pytorch_tanh"), rtol=1e-4, atol=1e-4)


def test_report_has_exactly_the_schema_keys(bp, pr):
    res = dict(fwd_ms=1.0, wall_ms=3.0, peak_mem_mib=50.0, graph_ms=None, graph_error="capture: host sync")
    dense = dict(fwd_ms=0.5, wall_ms=2.0, peak_mem_mib=25.0, graph_ms=1.5, graph_error=None)
    row = bp.layer_row("scattermoe", 64, 768, 8, 16384, "zipf", res, dense)
    assert set(row) == set(pr.LAYER_KEYS)
    required = {"impl", "E", "F", "K", "T", "routing", "graph_ratio", "wall_ratio", "peak_mem_ratio"}
    assert required <= set(row)
    assert row["graph_ratio"] is None and row["wall_ratio"] == 1.5 and row["peak_mem_ratio"] == 2.0
    e2e = [dict(model="dense", compiled="default", tokens_per_s=1e5, ratio=1.0)]
    report = pr.build_report("H200", [row], e2e)
    assert set(report) == {"gpu", "date", "layer", "e2e"}
    assert set(report["e2e"][0]) == set(pr.E2E_KEYS) == {"model", "compiled", "tokens_per_s", "ratio"}
    with pytest.raises(AssertionError):
        pr.build_report("H200", [dict(row, extra=1)], [])


def test_run_row_takes_every_measurement(bp, pr, monkeypatch):
    """``run`` reads ``bench_moe.measure``'s fields by name (a tuple unpacking broke on the GPU when measure
    gained a field); the GPU parts are replaced here, the row's assembly is real."""
    monkeypatch.setattr(bp, "measure", lambda fwd, leaves, iters: bp.Measured(1.0, 3.0, 50.0, None, 0.4))
    monkeypatch.setattr(bp, "try_graph", lambda step, iters: (2.5, None))
    x = torch.randn(4, 3, requires_grad=True)
    res = bp.run(lambda: x * 2, [x], iters=1, impl="triton")
    assert res == dict(
        fwd_ms=1.0, wall_ms=3.0, peak_mem_mib=50.0, graph_ms=2.5, graph_error=None, host_ms=0.4
    )
    row = bp.layer_row("triton", 8, 3072, 1, 8192, "zipf", res, dict(res, wall_ms=1.5, host_ms=0.1))
    assert set(row) == set(pr.LAYER_KEYS) and row["wall_ratio"] == 2.0 and row["dense_host_ms"] == 0.1


def test_report_file_is_replaced_whole_and_compile_modes_parse(bp, tmp_path):
    ms = dict(graph_ms=None, wall_ms=2.0, fwd_ms=1.0, peak_mem_mib=2.0)
    row = bp.layer_row("triton", 8, 3072, 1, 8192, "balanced", ms, ms)
    path = tmp_path / "h200.json"
    bp.write_report(str(path), "H200", [row], [], "2026-12-01T17:57:00+00:00")
    e2e = [dict(model="dense", compiled=False, tokens_per_s=1e5, ratio=1.0)]
    bp.write_report(str(path), "H200", [row], e2e, "2026-12-01T17:57:00+00:00")
    report = json.loads(path.read_text())
    assert report["layer"] == [row] and report["e2e"] == e2e
    assert report["layer_date"] == "2026-12-01T17:57:00+00:00"  # when the layer rows were measured
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h200.json"]  # no temporary file left
    assert bp.compile_modes(None) == [] and bp.compile_modes([]) == ["default"]
    assert bp.compile_modes(["default", "reduce-overhead"]) == ["default", "reduce-overhead"]
    assert bp.compile_modes(["default", "default", "reduce-overhead"]) == ["default", "reduce-overhead"]
    with pytest.raises(ValueError, match="a list of"):
        sys.modules["bench_moe"].bench_e2e(
            "default"
        )  # a string is no list of modes (it checks before any GPU work)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_refuses_without_cuda(bp, capsys):
    with pytest.raises(SystemExit) as exit_:
        bp.main(["--impls", "hf_grouped_mm"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "CUDA" in err[0]


def test_refuses_without_scattermoe(bp, peers, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(peers, "SCATTERMOE_DIR", tmp_path / "scattermoe")
    with pytest.raises(SystemExit) as exit_:
        bp.main(["--impls", "triton", "scattermoe"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and str(tmp_path / "scattermoe") in err[0]


def _refused(script, capsys, *argv) -> str:
    """``script.main(argv)`` refused: exit 2 and exactly one ``error:`` line; that line."""
    with pytest.raises(SystemExit) as exit_:
        script.main(list(argv))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


def _fake_gpu(bp, monkeypatch, name="NVIDIA H200"):
    """A CUDA device named ``name`` as far as bench_peers can tell (none here: its GPU parts are replaced)."""
    monkeypatch.setattr(bp.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bp.torch.cuda, "get_device_name", lambda: name)


def _row(bp, impl="triton"):
    ms = dict(graph_ms=None, wall_ms=2.0, fwd_ms=1.0, peak_mem_mib=2.0, host_ms=0.5)
    return bp.layer_row(impl, 8, 3072, 1, 8192, "balanced", ms, ms)


def test_command_line_mistakes_are_refused_before_any_gpu_work(bp, pr, tmp_path, capsys):
    """Each is one error line naming the option, found when the command is read (no CUDA needed)."""
    report = tmp_path / "h200.json"
    assert "--e2e" in _refused(bp, capsys, "--e2e-only", "--json", str(report))
    assert "'bogus'" in _refused(bp, capsys, "--e2e", "--compile", "bogus")
    assert "'moe top-9 triton'" in _refused(bp, capsys, "--e2e", "moe top-9 triton")
    assert "--e2e" in _refused(bp, capsys, "--compile", "default")  # --compile alone measures nothing
    assert "--iters" in _refused(bp, capsys, "--iters", "0")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    assert "not a bench_peers report" in _refused(
        bp, capsys, "--json", str(notes)
    )  # not replaced by a report
    assert notes.read_text() == "my notes"
    assert "folder" in _refused(bp, capsys, "--json", str(tmp_path / "missing" / "h200.json"))
    assert "folder" in _refused(bp, capsys, "--json", str(tmp_path))
    err = _refused(bp, capsys, "--e2e-only", "--e2e", "--json", str(report), "--shapes", "fine")
    assert "measures no layer rows" in err and "--shapes" in err
    for typed_default in (
        ["--iters", "30"],
        ["--impls", *bp.LAYER_DEFAULTS["impls"]],
    ):  # given, though the default
        err = _refused(bp, capsys, "--e2e-only", "--e2e", "--json", str(report), *typed_default)
        assert f"drop {typed_default[0]}" in err
    assert "drop --iters" in _refused(bp, capsys, "--check-only", "--iters", "30")
    # --check-only measures and writes nothing: whatever would be is named (a stray partial report is not)
    pr.partial_path(str(report)).write_text("stray")
    err = _refused(bp, capsys, "--check-only", "--e2e", "--compile", "--json", str(report))
    assert "--check-only runs the check against eager alone: drop --e2e --compile --json" in err
    assert "--skip-uncompiled" in _refused(bp, capsys, "--check-only", "--skip-uncompiled")
    err = _refused(
        bp,
        capsys,
        "--check-only",
        "--impls",
        "naive",
        "--shapes",
        "fine",
        "--routing",
        "zipf",
        "--iters",
        "7",
    )
    assert (
        "drop --shapes --routing --iters" in err
    )  # the check runs on its own shapes; --impls is what it takes
    assert not report.exists()


def test_e2e_only_reads_the_report_it_extends(bp, pr, tmp_path, capsys):
    report = tmp_path / "h200.json"
    report.write_text("{not json")
    assert str(report) in _refused(bp, capsys, "--e2e-only", "--e2e", "--json", str(report))
    assert report.read_text() == "{not json"  # a file it cannot read is left as it was
    report.write_text(
        json.dumps(dict(pr.build_report("H200", [_row(bp)], []), layer=[dict(_row(bp), extra=1)]))
    )
    assert "unknown ['extra']" in _refused(bp, capsys, "--e2e-only", "--e2e", "--json", str(report))
    for bad in (
        dict(layer=[list(_row(bp))]),
        dict(e2e=[["model"]]),
        dict(date=None),
    ):  # rows not objects, no date
        report.write_text(json.dumps(pr.build_report("H200", [_row(bp)], []) | bad))
        assert "not a bench_peers report" in _refused(bp, capsys, "--layer-only", "--json", str(report))
    old = {
        k: v for k, v in _row(bp).items() if k not in pr.OPTIONAL_LAYER_KEYS
    }  # a report from before host_ms
    report.write_text(json.dumps(dict(pr.build_report("H200", [_row(bp)], []), layer=[old])))
    assert bp.read_report(report)["layer"] == [dict(old, host_ms=None, dense_host_ms=None)]


def test_e2e_only_keeps_the_layer_rows_other_e2e_rows_and_notes(bp, pr, tmp_path, monkeypatch, capsys):
    """The GPU parts replaced (no CUDA here); the merge into the existing report is real."""
    report = tmp_path / "h200.json"
    e2e_old = [
        dict(model="dense", compiled="default", tokens_per_s=2e5, ratio=1.0),
        dict(model="dense", compiled=False, tokens_per_s=1.0, ratio=1.0),
        dict(
            model="moe top-2 triton", compiled=False, tokens_per_s=0.5, ratio=0.5
        ),  # measured again (named below): replaced by this run's rows, which lack it
    ]
    old = dict(
        pr.build_report("NVIDIA H200", [_row(bp)], e2e_old),
        note="by hand",
        layer_date="2026-12-01T17:57:00+00:00",
    )
    report.write_text(json.dumps(old))
    _fake_gpu(bp, monkeypatch)
    asked = []

    def fake_e2e(modes, only, done=None, uncompiled=True):
        asked.append((modes, only))
        return [
            dict(
                model="dense", compiled=False, tokens_per_s=1.5e5, ratio=1.0, rounds=[1.5e5], e2e_model="gpt2"
            )
        ]

    monkeypatch.setattr(bp, "bench_e2e", fake_e2e)
    bp.main(["--e2e-only", "--e2e", "moe top-1 triton", "moe top-2 triton", "--json", str(report)])
    assert asked == [([], ["moe top-1 triton", "moe top-2 triton"])]
    new = json.loads(report.read_text())
    assert new["layer"] == old["layer"] and new["note"] == "by hand"
    assert new["layer_date"] == "2026-12-01T17:57:00+00:00"
    assert new["e2e"] == [e2e_old[0], dict(model="dense", compiled=False, tokens_per_s=1.5e5, ratio=1.0)]
    monkeypatch.setattr(bp.torch.cuda, "get_device_name", lambda: "NVIDIA H100")
    assert "H200" in _refused(bp, capsys, "--e2e-only", "--e2e", "--json", str(report))
    assert json.loads(report.read_text()) == new  # a refusal writes nothing


def test_layer_only_keeps_the_e2e_rows_and_their_dates(bp, pr, tmp_path, monkeypatch, capsys):
    """``--layer-only``: new layer rows, the report's e2e rows, their ``e2e_dates`` and notes kept; ``--e2e-only``
    dates each compile mode's rows, keeping the dates of the modes it does not measure again, through any chain of
    partial runs. The GPU parts replaced (no CUDA here); the merge into the existing report is real. Mistakes:
    one error line, before any measurement, nothing written."""
    report = tmp_path / "h200.json"
    assert "--layer-only needs --json" in _refused(bp, capsys, "--layer-only")
    for extra in (["--e2e"], ["--check-only"], ["--e2e-only", "--e2e"], ["--compile"]):
        assert extra[0] in _refused(bp, capsys, "--layer-only", "--json", str(report), *extra)
    assert not report.exists()
    d0 = "2026-01-01T00:00:00+00:00"
    e2e_old = [dict(model="dense", compiled=False, tokens_per_s=1.0, ratio=1.0)]
    compiled = dict(e2e_old[0], compiled="default")
    old = dict(
        pr.build_report("NVIDIA H200", [_row(bp, "naive")], [*e2e_old, compiled]), note="by hand", date=d0
    )
    report.write_text(json.dumps(old))  # a report from before e2e_dates
    _fake_gpu(bp, monkeypatch)
    monkeypatch.setattr(bp, "check_impls", lambda impls: impls)
    monkeypatch.setattr(bp, "bench", lambda impls, shapes, kinds, iters, done: [_row(bp)])
    bp.main(["--layer-only", "--impls", "triton", "naive", "--json", str(report)])
    new = json.loads(report.read_text())
    assert new["layer"] == [_row(bp)] and new["e2e"] == old["e2e"] and new["note"] == "by hand"
    assert new["e2e_dates"] == {"uncompiled": d0, "default": d0} and new["layer_date"] > d0
    measured = []

    def fake_e2e(modes, only, done=None, uncompiled=True):
        return [
            dict(r, rounds=[1.0], e2e_model="gpt2")
            for r in e2e_old + [dict(compiled, compiled=m) for m in modes]
        ]

    monkeypatch.setattr(bp, "bench_e2e", fake_e2e)
    for modes in ([], ["reduce-overhead"], ["default"]):
        bp.main(["--e2e-only", "--e2e", "--json", str(report), *(["--compile", *modes] if modes else [])])
        measured.append(json.loads(report.read_text()))
    first, second, third = measured
    assert first["e2e_dates"] == {"default": d0, "uncompiled": first["date"]}
    assert second["e2e_dates"] == {
        "default": d0,
        "uncompiled": second["date"],
        "reduce-overhead": second["date"],
    }
    # the `default` rows of d0 are gone: no date of theirs stays
    assert third["e2e_dates"] == {
        "reduce-overhead": second["date"],
        "uncompiled": third["date"],
        "default": third["date"],
    }
    monkeypatch.setattr(bp.torch.cuda, "get_device_name", lambda: "NVIDIA H100")
    monkeypatch.setattr(bp, "bench", lambda *a: pytest.fail("measured before the refusal"))
    before = report.read_text()
    assert "H200" in _refused(bp, capsys, "--layer-only", "--impls", "triton", "--json", str(report))
    assert report.read_text() == before  # a refusal writes nothing
    layer_only = dict(
        third, e2e=[], e2e_dates={}
    )  # no e2e rows to keep: another GPU may replace the layer rows
    report.write_text(json.dumps(layer_only))
    monkeypatch.setattr(bp, "bench", lambda impls, shapes, kinds, iters, done: [_row(bp)])
    bp.main(["--layer-only", "--impls", "triton", "--json", str(report)])
    assert json.loads(report.read_text())["gpu"] == "NVIDIA H100"


def _drop_report(bp, pr, report, e2e_rows):
    """A report at ``report``: layer rows triton and naive (E=8 top-1 balanced) and triton (E=64 zipf); e2e rows
    ``(model, compiled)``."""
    fine = dict(_row(bp), E=64, F=768, K=8, T=16384, routing="zipf")
    e2e = [dict(model=m, compiled=c, tokens_per_s=1.0, ratio=1.0) for m, c in e2e_rows]
    report.write_text(json.dumps(pr.build_report("NVIDIA H200", [_row(bp), _row(bp, "naive"), fine], e2e)))
    return report.read_text()


def test_runs_refuse_to_drop_rows_they_do_not_measure(bp, pr, tmp_path, monkeypatch, capsys):
    """A plain run replaces the whole report, ``--layer-only`` its layer rows, ``--e2e-only`` its rows of each mode
    it measures: one that would not measure some of them again is refused before any work,
    naming them (E, F, K, T, routing; model and mode), nothing written (2026-12-03: ``--e2e-only --e2e "moe top-1
    triton" "moe top-2 triton" --compile reduce-overhead`` dropped the graphed models' uncompiled rows, measured
    minutes before)."""
    report = tmp_path / "h200.json"
    before = _drop_report(bp, pr, report, [
        ("dense", False), ("moe top-1 triton", False), ("moe top-1 triton graphed", False),
        ("dense", "reduce-overhead"), ("moe top-1 triton", "reduce-overhead")])  # fmt: skip
    _fake_gpu(bp, monkeypatch)
    monkeypatch.setattr(bp, "check_impls", lambda impls: impls)
    monkeypatch.setattr(bp, "bench", lambda *a: pytest.fail("measured before the refusal"))
    monkeypatch.setattr(bp, "bench_e2e", lambda *a, **k: pytest.fail("measured before the refusal"))
    layer = ["--layer-only", "--json", str(report)]
    err = _refused(bp, capsys, *layer, "--impls", "triton", "naive", "--shapes", "gpt2")
    assert "drop 1 of its layer rows" in err and "(triton E=64 F=768 K=8 T=16384 zipf)" in err
    assert "(naive E=8 F=3072 K=1 T=8192 balanced)" in _refused(bp, capsys, *layer, "--impls", "triton")
    assert "E=64" in _refused(bp, capsys, *layer, "--impls", "triton", "naive", "--routing", "balanced")
    e2e_run = ["--e2e-only", "--json", str(report), "--e2e", "moe top-1 triton"]
    err = _refused(bp, capsys, *e2e_run)
    assert "'moe top-1 triton graphed' (uncompiled)" in err and "reduce-overhead" not in err
    assert "graphed" in _refused(bp, capsys, *e2e_run, "--compile", "reduce-overhead")
    err = _refused(bp, capsys, "--e2e-only", "--json", str(report), "--e2e", "moe top-1 triton graphed",
                   "--compile", "reduce-overhead")  # fmt: skip
    assert "'moe top-1 triton' (reduce-overhead)" in err
    plain = ["--impls", "triton", "naive", "--json", str(report)]
    assert "replaces the whole report" in _refused(bp, capsys, *plain)  # no --e2e: every e2e row would go
    assert "'moe top-1 triton' (reduce-overhead)" in _refused(bp, capsys, *plain, "--e2e")  # nor that mode
    assert report.read_text() == before
    measured = []
    monkeypatch.setattr(bp, "bench", lambda impls, shapes, kinds, iters, done: measured.append(shapes) or [])
    monkeypatch.setattr(
        bp, "bench_e2e", lambda modes, only, done=None, uncompiled=True: measured.append((modes, only)) or []
    )
    bp.main([*layer, "--impls", "triton", "naive", "--shapes", "gpt2", "fine", "gpt2"])  # every row again
    bp.main([*e2e_run, "moe top-1 triton graphed", "--compile", "reduce-overhead"])
    bp.main(["--e2e-only", "--json", str(report), "--e2e"])  # bare: every model
    assert measured == [["gpt2", "fine"], (["reduce-overhead"], ["moe top-1 triton", "moe top-1 triton graphed"]),
                        ([], None)]  # fmt: skip
    _drop_report(bp, pr, report, [("dense", "default"), ("moe top-2 triton", "default")])
    bp.main(
        ["--e2e-only", "--json", str(report), "--e2e", "moe top-1 triton"]
    )  # `default` rows not measured:
    assert [r["compiled"] for r in json.loads(report.read_text())["e2e"]] == ["default", "default"]  # kept
    bp.main([*plain, "--e2e", "--compile", "default"])  # a plain run measuring every row: let through
    assert measured[-2:] == [["gpt2", "fine"], (["default"], None)]


def test_skip_uncompiled_measures_the_compiled_modes_only(bp, pr, tmp_path, monkeypatch, capsys):
    """``--skip-uncompiled``: bench_e2e measures the ``--compile`` modes only; ``--e2e-only`` keeps the report's
    uncompiled rows (the graphed models' too) and replaces the measured mode's; a plain run, which replaces the
    whole report, is refused where it has uncompiled rows; without ``--compile`` it would measure nothing."""
    report = tmp_path / "h200.json"
    rows = [("dense", False), ("moe top-1 triton graphed", False), ("dense", "reduce-overhead")]
    _drop_report(bp, pr, report, rows)
    _fake_gpu(bp, monkeypatch)
    assert "--compile" in _refused(
        bp, capsys, "--e2e-only", "--e2e", "--skip-uncompiled", "--json", str(report)
    )
    asked = []

    def fake_e2e(modes, only, done=None, uncompiled=True):
        asked.append((modes, uncompiled))
        return [dict(model="dense", compiled=m, tokens_per_s=5.0, ratio=1.0, rounds=[5.0], e2e_model="gpt2")
                for m in ([False] if uncompiled else []) + modes]  # fmt: skip

    monkeypatch.setattr(bp, "bench_e2e", fake_e2e)
    argv = [
        "--e2e",
        "moe top-1 triton",
        "--compile",
        "reduce-overhead",
        "--skip-uncompiled",
        "--json",
        str(report),
    ]
    bp.main(["--e2e-only", *argv])
    assert asked == [(["reduce-overhead"], False)]
    got = [(r["model"], r["compiled"], r["tokens_per_s"]) for r in json.loads(report.read_text())["e2e"]]
    assert got == [
        ("dense", False, 1.0),
        ("moe top-1 triton graphed", False, 1.0),
        ("dense", "reduce-overhead", 5.0),
    ]
    before = report.read_text()
    monkeypatch.setattr(bp, "check_impls", lambda impls: impls)
    err = _refused(bp, capsys, "--impls", "triton", "naive", *argv)
    assert "replaces the whole report" in err and "(uncompiled)" in err and report.read_text() == before
    with pytest.raises(ValueError, match="nothing to measure"):
        sys.modules["bench_moe"].bench_e2e([], uncompiled=False)  # before any GPU work


def test_skip_uncompiled_and_repeated_names_on_new_reports(bp, tmp_path, monkeypatch, capsys):
    """A plain run with ``--skip-uncompiled`` on a new report measures the compiled modes only; without
    ``--compile`` (a plain run too) it is refused, and ``--layer-only`` names it among what to drop;
    ``bench_e2e``'s modes; ``--impls``, ``--shapes`` and ``--routing`` each once."""
    moe = sys.modules["bench_moe"]
    assert moe.e2e_modes(["default"]) == (None, "default") and moe.e2e_modes(["default"], False) == (
        "default",
    )
    assert moe.e2e_modes([]) == (None,)
    with pytest.raises(ValueError, match="nothing to measure"):
        moe.e2e_modes([], uncompiled=False)
    assert "--compile" in _refused(bp, capsys, "--e2e", "--skip-uncompiled")
    graphed = ["moe top-1 triton graphed", "moe top-2 triton graphed"]
    err = _refused(bp, capsys, "--e2e", *graphed, graphed[0], "--compile", "--skip-uncompiled")
    assert f"--skip-uncompiled: {graphed[0]}, {graphed[1]} run uncompiled only" in err  # each named once
    mixed = [
        "moe top-1 triton experts-graphed",
        "moe top-1 triton",
    ]  # a graphed one among others: no row either
    err = _refused(bp, capsys, "--e2e", *mixed, "--compile", "--skip-uncompiled")
    assert "--skip-uncompiled: moe top-1 triton experts-graphed run uncompiled only" in err
    err = _refused(bp, capsys, "--layer-only", "--skip-uncompiled", "--json", str(tmp_path / "r.json"))
    assert "drop --skip-uncompiled" in err
    _fake_gpu(bp, monkeypatch)
    monkeypatch.setattr(bp, "check_impls", lambda impls: impls)
    seen = []
    monkeypatch.setattr(
        bp, "bench", lambda impls, shapes, kinds, iters, done: seen.append((list(impls), kinds)) or [_row(bp)]
    )

    def fake_e2e(modes, only, done=None, uncompiled=True):
        seen.append((modes, uncompiled))
        return [dict(model="dense", compiled=m, tokens_per_s=1.0, ratio=1.0, rounds=[1.0], e2e_model="gpt2")
                for m in ([False] if uncompiled else []) + modes]  # fmt: skip

    monkeypatch.setattr(bp, "bench_e2e", fake_e2e)
    report = tmp_path / "new.json"
    bp.main(["--impls", "naive", "triton", "naive", "--routing", "zipf", "zipf", "--e2e", "--compile",
             "reduce-overhead", "--skip-uncompiled", "--json", str(report)])  # fmt: skip
    assert seen == [(["naive", "triton"], ["zipf"]), (["reduce-overhead"], False)]
    assert [r["compiled"] for r in json.loads(report.read_text())["e2e"]] == ["reduce-overhead"]


def test_rows_of_odd_reports_and_failed_checks_are_refused_not_dropped(bp, pr, tmp_path, monkeypatch, capsys):
    """An implementation failing its check against eager would leave its rows out of the new report: refused
    after the check, before any measurement. A row whose naming values are of the wrong kind (a hand edit): one
    error line, not a traceback; a hand-added row that differs in T alone is named by its T."""
    report = tmp_path / "h200.json"
    before = _drop_report(bp, pr, report, [])
    _fake_gpu(bp, monkeypatch)
    monkeypatch.setattr(bp, "check_impls", lambda impls: {k: v for k, v in impls.items() if k != "naive"})
    monkeypatch.setattr(bp, "bench", lambda *a: pytest.fail("measured before the refusal"))
    err = _refused(bp, capsys, "--layer-only", "--impls", "triton", "naive", "--json", str(report))
    assert "naive failed the check against eager" in err and report.read_text() == before
    old = json.loads(before)
    for bad, why in ((dict(E=[8]), "positive integers"), (dict(impl={"a": 1}), "strings"),
                     (dict(T=0), "positive integers"), (dict(F=[3072]), "positive integers"),
                     (dict(K=True), "positive integers"), (dict(routing=["zipf"]), "strings")):  # fmt: skip
        report.write_text(json.dumps(dict(old, layer=[dict(old["layer"][0], **bad)])))
        assert why in _refused(
            bp, capsys, "--layer-only", "--impls", "triton", "naive", "--json", str(report)
        )
    report.write_text(
        json.dumps(dict(old, e2e=[dict(model=None, compiled=False, tokens_per_s=1.0, ratio=1.0)]))
    )
    assert "'model' must be a string" in _refused(bp, capsys, "--e2e-only", "--e2e", "--json", str(report))
    for compiled in (
        "",
        "uncompiled",
        0,
        None,
        True,
        ["default"],
    ):  # hand edits: false or a compile mode only
        row = dict(model="dense", compiled=compiled, tokens_per_s=1.0, ratio=1.0)
        report.write_text(json.dumps(dict(old, e2e=[row])))
        err = _refused(bp, capsys, "--e2e-only", "--e2e", "--json", str(report))
        assert "'compiled' must be false or one of default, reduce-overhead" in err
    report.write_text(json.dumps(dict(old, layer=[*old["layer"], dict(old["layer"][0], T=4096)])))
    assert "(triton E=8 F=3072 K=1 T=4096 balanced)" in _refused(
        bp, capsys, "--layer-only", "--impls", "triton", "naive", "--json", str(report)
    )


def test_bench_hands_over_each_group_as_it_is_measured(bp, monkeypatch):
    """``bench``'s ``done`` after each (shape, routing) group but the last: the rows so far and the groups still to
    measure, in the order measured (real loop on the CPU; the GPU timing and the routing replaced)."""
    monkeypatch.setattr(bp, "SHAPES", {"gpt2": [(4, 8, 1, 16)], "fine": [(4, 8, 2, 16)]})
    events = []  # ("routing", kind) / ("call", impl, kind of the routing it got) / ("timed", impl), in order

    def fake_routing(T, E, K, kind, gen):
        events.append(("routing", kind))
        return torch.zeros(T, K, dtype=torch.long), torch.ones(T, K)

    def impl(name):
        def fn(x, w1, b1, w2, b2, idx, wts, act):
            events.append(("call", name, events[-1][1] if events[-1][0] == "routing" else events[-1][2]))
            return x * (w1.sum() + b1.sum() + w2.sum() + b2.sum()) + wts.sum()

        return fn

    ms = dict(graph_ms=1.0, wall_ms=2.0, fwd_ms=1.0, peak_mem_mib=2.0, host_ms=0.5, graph_error=None)
    monkeypatch.setattr(bp, "routing", fake_routing)
    monkeypatch.setattr(
        bp, "run", lambda fwd, leaves, iters, impl=None: events.append(("timed", impl)) or dict(ms)
    )
    same = lambda *p: p  # noqa: E731
    seen = []
    rows = bp.bench({"a": (impl("a"), same, same), "b": (impl("b"), same, same)}, ["gpt2", "fine"],
                    ["balanced", "zipf"], 1, lambda rows, pending: seen.append((rows, pending)), device="cpu")  # fmt: skip
    # at each shape, before anything is timed: one call of every implementation on a Zipf routing (tuning)
    warmup = [("routing", "zipf"), ("call", "a", "zipf"), ("call", "b", "zipf"), ("routing", "balanced")]
    starts = [i for i, e in enumerate(events) if e == ("routing", "zipf") and events[i + 1][0] == "call"]
    assert len(starts) == 2 and all(events[i : i + 4] == warmup for i in starts)
    assert [e[1] for e in events if e[0] == "timed"] == [None, "a", "b", "a", "b"] * 2  # None: the dense MLP
    groups = [(E, F, K, T, r) for E, F, K, T in [(4, 8, 1, 16), (4, 8, 2, 16)] for r in ("balanced", "zipf")]
    assert bp.pending_groups(["gpt2", "fine"], ["balanced", "zipf"]) == [
        dict(zip(("E", "F", "K", "T", "routing"), g, strict=True)) for g in groups
    ]
    assert [len(r) for r, _ in seen] == [2, 4, 6] and len(rows) == 8  # the caller writes the last group's
    assert [[tuple(g.values()) for g in p] for _, p in seen] == [groups[1:], groups[2:], groups[3:]]
    assert [(r["impl"], r["K"], r["routing"]) for r in rows[2:4]] == [("a", 1, "zipf"), ("b", 1, "zipf")]


def test_a_run_cut_short_keeps_the_groups_it_measured(bp, pr, tmp_path, monkeypatch, capsys):
    """A layer run stopped after its first group leaves ``--json`` as it was and, beside it, the report it would
    have written so far with ``layer_pending`` naming the rest (``--layer-only``: the e2e rows and notes kept);
    ``--e2e-only`` on that partial report keeps the list; a run that finishes writes ``--json`` without it and
    removes the partial report."""
    report, partial = tmp_path / "h200.json", tmp_path / "h200.partial.json"
    e2e_old = [dict(model="dense", compiled=False, tokens_per_s=1.0, ratio=1.0)]
    old = dict(pr.build_report("NVIDIA H200", [_row(bp, "naive")], e2e_old), note="by hand")
    report.write_text(json.dumps(old))
    _fake_gpu(bp, monkeypatch)
    monkeypatch.setattr(bp, "check_impls", lambda impls: impls)
    rest = bp.pending_groups(["gpt2", "fine"], ["balanced", "zipf"])[1:]

    def cut(impls, shapes, kinds, iters, done):
        done([_row(bp)], rest)
        raise KeyboardInterrupt  # the machine's time limit

    monkeypatch.setattr(bp, "bench", cut)
    for argv, e2e in ((["--layer-only"], e2e_old), (["--e2e"], [])):
        with pytest.raises(KeyboardInterrupt):
            bp.main([*argv, "--impls", "triton", "naive", "--json", str(report)])
        assert json.loads(report.read_text()) == old
        got = json.loads(partial.read_text())
        assert got["layer"] == [_row(bp)] and got["e2e"] == e2e and got["layer_pending"] == rest
        assert got.get("note") == ("by hand" if argv == ["--layer-only"] else None)
        assert "7 (shape, routing) groups pending" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "h200.json",
        "h200.partial.json",
    ]  # no temporary file
    monkeypatch.setattr(
        bp,
        "bench_e2e",
        lambda modes, only, done=None, uncompiled=True: [dict(e2e_old[0], rounds=[1.0], e2e_model="gpt2")],
    )
    bp.main(["--e2e-only", "--e2e", "--json", str(partial)])
    got = json.loads(partial.read_text())
    assert got["layer_pending"] == rest and got["e2e"] == e2e_old and got["layer"] == [_row(bp)]
    monkeypatch.setattr(bp, "bench", lambda impls, shapes, kinds, iters, done: [_row(bp)])
    bp.main(["--layer-only", "--impls", "triton", "naive", "--json", str(report)])
    got = json.loads(report.read_text())
    assert "layer_pending" not in got and got["e2e"] == e2e_old and got["layer"] == [_row(bp)]
    assert not partial.exists()


def test_an_e2e_run_cut_short_keeps_the_modes_it_measured(bp, pr, tmp_path, monkeypatch):
    """``--e2e-only --compile default reduce-overhead`` stopped after its uncompiled and ``default`` rounds: their
    rows replace the report's rows of those modes, each dated when this run first wrote it; the ``reduce-overhead``
    rows stay with their date, and so do the layer rows, ``layer_pending`` and notes; on another GPU the old rows
    go at once. A plain run with ``--e2e`` writes its rows after each mode too."""
    report = tmp_path / "h200.json"
    d0 = "2026-01-01T00:00:00+00:00"
    row = lambda mode, tps: dict(model="dense", compiled=mode, tokens_per_s=tps, ratio=1.0)  # noqa: E731
    pending = [dict(E=8, F=3072, K=2, T=8192, routing="zipf")]
    e2e_old = [row(False, 1.0), row("default", 2.0), row("reduce-overhead", 3.0)]
    old = pr.build_report("NVIDIA H200", [_row(bp)], e2e_old) | dict(
        date=d0, note="by hand", layer_pending=pending
    )
    _fake_gpu(bp, monkeypatch)
    clock = iter(f"2026-02-0{i}T00:00:00+00:00" for i in range(1, 10))
    monkeypatch.setattr(bp, "now", lambda: next(clock))  # when this run's modes were measured

    def cut(modes, only, done=None, uncompiled=True):
        rows = []
        for mode, tps in ((False, 10.0), ("default", 20.0)):
            rows.append(dict(row(mode, tps), rounds=[tps], e2e_model="gpt2"))
            done(list(rows))
        raise KeyboardInterrupt  # the machine's time limit, in the reduce-overhead mode

    monkeypatch.setattr(bp, "bench_e2e", cut)
    argv = ["--e2e-only", "--e2e", "--compile", "default", "reduce-overhead", "--json", str(report)]
    report.write_text(json.dumps(old))
    with pytest.raises(KeyboardInterrupt):
        bp.main(argv)
    got = json.loads(report.read_text())
    assert got["e2e"] == [row("reduce-overhead", 3.0), row(False, 10.0), row("default", 20.0)]
    assert got["e2e_dates"] == {
        "reduce-overhead": d0,
        "uncompiled": "2026-02-01T00:00:00+00:00",
        "default": "2026-02-02T00:00:00+00:00",
    }
    assert got["layer"] == [_row(bp)] and got["layer_pending"] == pending and got["note"] == "by hand"
    report.write_text(
        json.dumps(dict(old, layer=[], gpu="NVIDIA A100"))
    )  # no layer rows: another GPU may run
    with pytest.raises(KeyboardInterrupt):
        bp.main(argv)
    assert json.loads(report.read_text())["e2e"] == [
        row(False, 10.0),
        row("default", 20.0),
    ]  # none of the A100's
    monkeypatch.setattr(bp, "check_impls", lambda impls: impls)
    monkeypatch.setattr(bp, "bench", lambda impls, shapes, kinds, iters, done: [_row(bp)])
    with pytest.raises(KeyboardInterrupt):
        bp.main(["--impls", "triton", "--e2e", "--compile", "default", "--json", str(report)])
    got = json.loads(report.read_text())
    assert got["layer"] == [_row(bp)] and got["e2e"] == [row(False, 10.0), row("default", 20.0)]


def test_new_reports_and_what_is_beside_them(bp, pr, tmp_path, monkeypatch, capsys):
    """``--layer-only`` and ``--e2e-only`` start a report that does not exist yet; refused with one error line
    before any work, nothing written: a partial report's place holding a file that is no report, a link or a
    folder; a name too long for the temporary file beside it; a link that loops; every implementation failing its
    check (the report's rows are not replaced by none)."""
    _fake_gpu(bp, monkeypatch)
    monkeypatch.setattr(bp, "check_impls", lambda impls: impls)
    monkeypatch.setattr(bp, "bench", lambda impls, shapes, kinds, iters, done: [_row(bp)])
    e2e = [dict(model="dense", compiled=False, tokens_per_s=1.0, ratio=1.0)]
    monkeypatch.setattr(
        bp,
        "bench_e2e",
        lambda modes, only, done=None, uncompiled=True: [dict(e2e[0], rounds=[1.0], e2e_model="x")],
    )
    bp.main(["--layer-only", "--impls", "triton", "--json", str(tmp_path / "a.json")])
    assert json.loads((tmp_path / "a.json").read_text())["layer"] == [_row(bp)]
    bp.main(["--e2e-only", "--e2e", "--json", str(tmp_path / "b.json")])
    assert json.loads((tmp_path / "b.json").read_text())["e2e"] == e2e
    report, partial, mine = tmp_path / "h.json", tmp_path / "h.partial.json", tmp_path / "mine.txt"
    report.write_text(json.dumps(pr.build_report("NVIDIA H200", [_row(bp, "naive")], [])))
    before = report.read_text()
    mine.write_text("my notes")
    for make in (lambda: partial.write_text("my notes"), lambda: partial.symlink_to(mine), partial.mkdir):
        make()
        assert str(partial) in _refused(bp, capsys, "--impls", "triton", "--json", str(report))
        assert report.read_text() == before and mine.read_text() == "my notes"
        partial.rmdir() if partial.is_dir() else partial.unlink()
    too_long = tmp_path / ("x" * 300 + ".json")  # over the file system's 255 bytes: was an OSError traceback
    assert "not a usable file name" in _refused(bp, capsys, "--impls", "triton", "--json", str(too_long))
    assert "--json '': an empty name; give a JSON file" in _refused(
        bp, capsys, "--impls", "triton", "--json", ""
    )
    long = tmp_path / ("x" * 240 + ".json")
    assert "not writable" in _refused(bp, capsys, "--impls", "triton", "--json", str(long))
    (tmp_path / "loop.json").symlink_to(tmp_path / "loop.json")
    assert "loop.json" in _refused(bp, capsys, "--impls", "triton", "--json", str(tmp_path / "loop.json"))
    monkeypatch.setattr(bp, "check_impls", lambda impls: {})
    assert "no implementation passed" in _refused(
        bp, capsys, "--layer-only", "--impls", "triton", "naive", "--json", str(report)
    )  # (the default impls would ask for ScatterMoE's git-ignored copy first)
    assert report.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.json",
        "b.json",
        "h.json",
        "loop.json",
        "mine.txt",
    ]


def test_a_report_that_is_not_one_is_refused(bp, pr, tmp_path, capsys):
    """Odd contents of an existing report: one error line, the file left as it was."""
    report = tmp_path / "h200.json"
    good = pr.build_report("H200", [_row(bp)], [])
    for bad in (
        dict(good, layer=[list(_row(bp))]),  # rows that are not objects
        dict(good, e2e=[["model"]]),
        dict(good, date=None),
        dict(good, date="not a date"),
        dict(good, layer={}),
        dict(good, layer_date=[1, 2]),
        dict(good, e2e_dates=5),
        dict(good, e2e=[dict(model="dense", compiled=0, tokens_per_s=1.0, ratio=1.0)]),
        dict(good, layer_pending={"E": 8}),
        dict(good, layer_pending=[dict(E=8, F=3072, K=1, T=8192)]),  # no routing
        dict(good, layer_pending=None),
        dict(good, layer_pending=[dict(E="eight", F=3072, K=1, T=8192, routing="zipf")]),
        dict(good, layer_pending=[dict(E=True, F=3072, K=1, T=8192, routing="zipf")]),
        dict(good, layer_pending=[dict(E=8, F=3072, K=1, T=0, routing="zipf")]),
        dict(good, layer_pending=[dict(E=8, F=3072, K=1, T=8192, routing="uniform")]),
        dict(good, layer_pending=[dict(E=8, F=3072, K=1, T=8192, routing="zipf", x=1)]),  # an extra key
        dict(good, layer_pending=[dict(E=8, F=3072, K=1, T=8192, routing="zipf")] * 2),
    ):
        report.write_text(json.dumps(bad))
        assert "not a bench_peers report" in _refused(bp, capsys, "--layer-only", "--json", str(report)), bad
        assert json.loads(report.read_text()) == bad
    report.write_text("[" * 200000)  # nested too deep for Python's JSON reader
    assert "not a bench_peers report" in _refused(bp, capsys, "--layer-only", "--json", str(report))
    report.write_text(json.dumps(dict(good, e2e=[dict(model="dense", tokens_per_s=1.0, ratio=1.0)])))
    assert "an e2e row with keys missing ['compiled']" in _refused(
        bp, capsys, "--layer-only", "--json", str(report)
    )
    report.write_text(json.dumps(good))
    pr.partial_path(str(report)).write_text("my notes")  # a file of the user's where the partial report goes
    err = _refused(bp, capsys, "--layer-only", "--json", str(report))
    assert (
        f"--json {report}: its partial report {pr.partial_path(str(report))}: not a bench_peers report" in err
    )


def test_bench_moe_command_line_mistakes(bp, tmp_path, capsys):
    """bench_moe.py (imported by bench_peers): its mistakes too are one error line before any GPU work."""
    bm = sys.modules["bench_moe"]

    def refused(*argv) -> str:
        return _refused(bm, capsys, *argv)  # bench_moe's main, checked as bench_peers' is

    assert "--e2e-rounds" in refused("--e2e-rounds", "-3")
    assert "--skip-e2e" in refused("--skip-e2e", "--compile", "default")
    for option, value in (("--e2e-rounds", "5"), ("--e2e-model", "scaling")):  # nothing given is ignored
        said = refused("--skip-e2e", option, value)
        assert f"drop {option}," in said and "--skip-e2e" in said, said
    assert "'abc' is not an integer >= 1" in refused("--e2e-rounds", "abc")
    assert "--skip-profile" in refused("--skip-profile", "--profile-e2e-compile", "default")
    assert "'bogus'" in refused("--profile-e2e-compile", "bogus")
    assert "folder" in refused("--json", str(tmp_path / "missing" / "out.json"))


def test_bench_moe_e2e_options_left_unset_take_bench_e2e_defaults(bp, monkeypatch):
    """--e2e-model and --e2e-rounds default to None on the command line (so that --skip-e2e can refuse them when
    given); unset, bench_e2e's own defaults apply, given, they are passed on."""
    bm = sys.modules["bench_moe"]
    calls = []
    monkeypatch.setattr(bm.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bm.torch.cuda, "get_device_name", lambda: "fake GPU")
    monkeypatch.setattr(bm, "check_autotuned", lambda: None)
    monkeypatch.setattr(bm, "bench_e2e", lambda *a, **kw: calls.append((a, kw)) or [])
    skip = ["--skip-layer", "--skip-profile", "--skip-compile"]
    bm.main(skip)
    bm.main([*skip, "--e2e-model", "scaling", "--e2e-rounds", "5"])
    assert [kw for _, kw in calls] == [{}, {"kind": "scaling", "rounds": 5}]


def test_write_json_leaves_the_file_or_replaces_it_whole(bp, tmp_path):
    """``bench_moe.write_json``: a value JSON cannot hold fails with the old file intact and no temporary file
    left; a temporary name of an earlier killed run with this pid is never in the way (a random part)."""
    bm = sys.modules["bench_moe"]
    path = tmp_path / "r.json"
    path.write_text('{"old": 1}')
    (tmp_path / f".r.json.{os.getpid()}.tmp").write_text("left by a killed run")  # the old naming
    with pytest.raises(TypeError):
        bm.write_json(str(path), {"x": object()})
    assert path.read_text() == '{"old": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".r.json.{os.getpid()}.tmp", "r.json"]
    bm.write_json(str(path), {"new": 2})
    assert json.loads(path.read_text()) == {"new": 2}


def test_bench_moe_device_time_by_kernel_class(bp):
    """``profile_e2e``'s summary: each kernel name (as the profiler shows them on the H200, 2026-12-04, and PyTorch's
    own flash and memory-efficient attention kernels, cutlass templates) in its class, this project's Triton kernels
    by name before any pattern (a name of ours that a pattern matches), per step; every class listed, "all" their
    sum."""
    from types import SimpleNamespace

    bm = sys.modules["bench_moe"]
    ours = bm.project_kernel_names()
    assert {"_rows_kernel", "_wgrad_kernel", "_count_kernel", "_place_kernel", "_segsum_kernel"} <= ours
    names_us = {
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
        "FusedOptimizerTensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor>": 300.0,
        "nvjet_sm90_tst_192x128_64x5_1x2_h_bz_coopB_TNT": 60.0,
        "sm80_xmma_gemm_f32f32_f32f32_f32_tn_n_tilesize32x32x8_stage3": 6.0,
        "void cublasLt::splitKreduce_kernel<32, 16, int, float>": 3.0,
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7": 90.0,
        "triton_per_fused__to_copy_native_layer_norm_backward_view_5": 30.0,
        "triton_poi_fused__to_copy_18": 15.0,
        "_rows_kernel": 120.0,
        "_count_kernel": 3.0,
        "_gemm_rows_kernel": 6.0,  # ours (added below), and "gemm" matches cuBLAS' pattern
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, cutlass::bfloat16_t>>": 12.0,
        "fmha_cutlassF_bf16_aligned_64x64_rf_sm80": 18.0,
        "triton_for_fused_0": 3.0,
        "void at::native::vectorized_elementwise_kernel<8, at::native::FillFunctor<c10::BFloat16>>": 9.0,
    }
    events = [SimpleNamespace(key=k, self_device_time_total=us) for k, us in names_us.items()]
    got = bm.device_ms_by_class(events, 3, ours | {"_gemm_rows_kernel"})
    want = {"this project": 0.043, "fused AdamW": 0.1, "attention": 0.04, "cuBLAS": 0.023, "Inductor": 0.016}
    want |= {"other": 0.003, "all": sum(names_us.values()) / 3e3}
    assert list(got) == list(want)
    assert got == pytest.approx(want)


def test_e2e_rounds_reach_bench_e2e_and_need_e2e(bp, tmp_path, monkeypatch, capsys):
    """``--e2e-rounds N``: bench_e2e measures N interleaved rounds (without it, its own default); refused without
    ``--e2e``, with ``--check-only`` or ``--layer-only`` (no e2e rows there), and below 1, before any measurement."""
    _fake_gpu(bp, monkeypatch)
    asked = []

    def fake_e2e(modes, only, done=None, uncompiled=True, **kw):
        asked.append(kw)
        return [
            dict(model="dense", compiled=False, tokens_per_s=5.0, ratio=1.0, rounds=[5.0], e2e_model="gpt2")
        ]

    monkeypatch.setattr(bp, "bench_e2e", fake_e2e)
    report = tmp_path / "h200.json"
    argv = ["--e2e-only", "--e2e", "moe top-1 triton", "--json", str(report)]
    bp.main([*argv, "--e2e-rounds", "7"])
    bp.main(argv)
    assert asked == [{"rounds": 7}, {}]
    assert "--e2e " in _refused(bp, capsys, "--e2e-rounds", "4")
    assert "--e2e-rounds" in _refused(bp, capsys, "--check-only", "--e2e-rounds", "4")
    assert "--e2e-rounds" in _refused(bp, capsys, "--layer-only", "--e2e-rounds", "4", "--json", str(report))
    assert "--e2e-rounds" in _refused(bp, capsys, *argv, "--e2e-rounds", "0")
    assert len(asked) == 2


def test_e2e_variant_names_say_what_runs_from_graphs(bp):
    """ "graphed" is what ``train.cuda_graphs=auto`` takes (the whole model), the dense model too; "layers-graphed"
    and "experts-graphed" the per-layer extents; no suffix, none."""
    moe = sys.modules["bench_moe"]
    names = dict(moe.e2e_variants(None))
    assert {
        "dense",
        "dense graphed",
        "moe top-1 triton graphed",
        "moe top-2 grouped_mm layers-graphed",
    } <= set(names)
    assert names["dense graphed"] is None and names["moe top-2 triton graphed"]["top_k"] == 2
    for name, graphs in {
        "dense": None,
        "dense graphed": "model",
        "moe top-1 triton": None,
        "moe top-1 triton graphed": "model",
        "moe top-2 grouped_mm layers-graphed": "layers",
        "moe top-1 triton experts-graphed": "experts",
    }.items():
        assert moe.e2e_graphs(name) == graphs, name
    assert "dense" not in moe.e2e_names() and "dense graphed" in moe.e2e_names()
