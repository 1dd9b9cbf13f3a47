"""Trust: run folders never lose data (marker, one plain run name, an exclusive lock, launcher death),
nothing in a checkpoint executes (planted pickle payloads), the guard never saves exploded weights, and
filesystem or checkpoint damage is one error line. Each test names the guarantee of docs/training.md
("What is guaranteed") it backs."""

from __future__ import annotations

import hashlib
import json
import operator
import os
import pickle
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_reliability import assert_one_error_line, cfg_file, run_cli
from test_training_run import TINY

from moe_emergence.telemetry import read_metrics
from moe_emergence.training import checkpoint as ckpt
from moe_emergence.training.config import GuardConfig, config_from_dict
from moe_emergence.training.guard import StepCheck, judge
from moe_emergence.training.rollback import Snapshot
from moe_emergence.training.runlock import lock_path
from moe_emergence.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "tiny_data_cache"  # shared with test_reliability


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ----------------------------------------------------------------------------- A1: run folders


@pytest.mark.parametrize("name", ["", ".", "..", "../escaped", "/abs", "a/b", "a\\b", ".hidden", "x/"])
def test_run_name_is_one_plain_component(tmp_path, capsys, cache, name):
    path = cfg_file(tmp_path, cache)
    rc, err = run_cli(capsys, "--config", path, f"log.run_name={name}")
    assert rc == 2
    assert_one_error_line(err, r"log\.run_name=.* is invalid: one plain folder name")
    assert listing(tmp_path) == ["tiny.yaml"]  # nothing written anywhere, outside output_dir neither


def test_overwrite_replaces_only_marked_run_folders(tmp_path, capsys, cache):
    """Guarantee: --overwrite deletes only a folder a run created, holding only what a run writes."""
    path = cfg_file(tmp_path, cache, train__steps=1, model__upcycle_at_step=0)
    runs = tmp_path / "runs"
    foreign = runs / "tiny"
    foreign.mkdir(parents=True)
    (foreign / "precious.txt").write_text("mine")
    rc, err = run_cli(capsys, "--config", path, "--overwrite")
    assert rc == 2
    assert_one_error_line(
        err, r"--overwrite refused: .*tiny' was not created by a training run .*precious\.txt"
    )
    rc, err = run_cli(capsys, "--config", path)  # a new run into a non-empty foreign folder
    assert rc == 2
    assert_one_error_line(err, r"exists and holds precious\.txt, not a run")
    assert listing(runs) == ["tiny", "tiny/precious.txt"]

    (foreign / "precious.txt").unlink()  # an empty folder is fine for a new run
    assert run_cli(capsys, "--config", path)[0] == 0
    assert (foreign / ".moe_emergence_run").is_file()
    (foreign / "notes.txt").write_text("my notes")  # the user's file inside a run folder
    (runs / "sibling.txt").write_text("next to it")
    rc, err = run_cli(capsys, "--config", path, "--overwrite")
    assert rc == 2
    assert_one_error_line(err, r"also holds files a run does not write: notes\.txt")
    assert (foreign / "notes.txt").read_text() == "my notes"
    (foreign / "notes.txt").unlink()
    before = (foreign / "metrics.jsonl").read_text()
    assert run_cli(capsys, "--config", path, "--overwrite")[0] == 0  # a pure run folder is replaced
    assert (foreign / "metrics.jsonl").read_text() != "" and (
        runs / "sibling.txt"
    ).read_text() == "next to it"
    assert before.count("\n") == (foreign / "metrics.jsonl").read_text().count("\n")
    assert sorted(p.name for p in runs.iterdir()) == ["sibling.txt", "tiny"]  # no lock file left behind


def test_output_dir_that_is_a_file(tmp_path, capsys, cache):
    path = cfg_file(tmp_path, cache)
    (tmp_path / "runs").write_text("not a folder")
    rc, err = run_cli(capsys, "--config", path)
    assert rc == 2
    assert_one_error_line(err, r"output_dir '.*runs' is a file, not a folder")
    assert (tmp_path / "runs").read_text() == "not a folder"


# ----------------------------------------------------------------------------- A2, A3: lock, launcher death


def _launch(cmd: list[str], log: Path, **env) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.Popen(cmd, env=full_env, stdout=log.open("a"), stderr=subprocess.STDOUT, cwd=log.parent)


def _wait(cond, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < end, f"timed out: {log.read_text()[-3000:]}"
        time.sleep(0.05)


def _steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    return path.read_text().count('"train/loss"') if path.exists() else 0


def test_second_writer_is_refused_and_the_lock_dies_with_its_process(tmp_path, capsys, cache):
    """Guarantee: one writer per run folder; a second launch (new run, --resume auto or --overwrite) gets
    one error line naming the PID; kill -9 of the holder frees the folder for --resume auto."""
    path = cfg_file(tmp_path, cache, train__steps=400, checkpoint__every=2, log__every=1)
    run, log = tmp_path / "runs" / "tiny", tmp_path / "live.log"
    proc = _launch([sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(path)], log)
    try:
        _wait(lambda: _steps(run) >= 3, proc, log)
        assert json.loads(lock_path(run).read_text())["pid"] == proc.pid
        for extra in ([], ["--resume", "auto"], ["--overwrite"]):
            rc, err = run_cli(capsys, "--config", path, *extra)
            assert rc == 2, extra
            assert_one_error_line(err, rf"run folder '.*tiny' is in use by process {proc.pid} on ")
        assert proc.poll() is None  # the live run was not disturbed
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert lock_path(run).exists()  # left behind by kill -9, but its flock died with the process
    rc, err = run_cli(capsys, "--config", path, "train.steps=400", "train.stop_after=1", "--resume", "auto")
    assert rc == 0, err
    records = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r]
    assert records == sorted(set(records))  # no duplicated or out-of-order steps
    assert not lock_path(run).exists()


@pytest.mark.parametrize("progress", [False, True], ids=["quiet", "progress_bar"])
def test_killing_the_launcher_stops_the_training_process(tmp_path, cache, progress):
    """Guarantee: kill -9 of `accelerate launch` stops its training child within seconds, after a
    checkpoint (exit 143 by SIGTERM), and the lock is free again; also with the progress bar on, which
    writes to the launcher's stderr pipe (accelerate 1.16), left without a reader, many times a second."""
    path = cfg_file(
        tmp_path, cache, train__steps=2000, checkpoint__every=1000, log__every=1, log__progress=progress
    )
    run, log = tmp_path / "runs" / "tiny", tmp_path / "launch.log"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += [str(ROOT / "scripts" / "train.py"), "--config", str(path)]
    launcher = _launch(cmd, log)
    try:
        _wait(lambda: _steps(run) >= 2 and lock_path(run).exists(), launcher, log)
        child = json.loads(lock_path(run).read_text())["pid"]
        assert child != launcher.pid
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=30)
        end = time.monotonic() + 60
        while time.monotonic() < end and Path(f"/proc/{child}").exists():
            if Path(f"/proc/{child}/stat").read_text().split()[2] == "Z":
                break
            time.sleep(0.1)
        assert (
            not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
        )
    finally:
        if launcher.poll() is None:
            launcher.kill()
    text = log.read_text()
    # the watch thread's reason, or the progress bar's write to the pipe the launcher no longer reads
    reasons = ("the launcher (process", "stderr has no reader: stopping")
    assert any(r in text for r in reasons) and "SIGTERM: saving a checkpoint" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    steps_then = _steps(run)
    time.sleep(1.0)
    assert _steps(run) == steps_then  # nothing writes any more
    assert ckpt.list_checkpoints(run / "checkpoints")  # it saved before stopping
    assert not lock_path(run).exists()


def test_a_run_whose_output_reader_is_gone_stops_with_a_checkpoint(tmp_path, cache):
    """Guarantee: a run whose stderr pipe loses its reader (``| tee`` killed; no launcher) is not ended by
    ``BrokenPipeError`` from its progress bar: the output moves onto stdout, and the run stops as by SIGTERM
    (checkpoint, exit 143, lock free)."""
    path = cfg_file(
        tmp_path, cache, train__steps=2000, checkpoint__every=1000, log__every=1, log__progress=True
    )
    run, log = tmp_path / "runs" / "tiny", tmp_path / "out.log"
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("a") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        _wait(lambda: _steps(run) >= 2, proc, log)
        proc.stderr.close()  # the reader is gone
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert rc == 128 + signal.SIGTERM, text[-3000:]
    assert "stderr has no reader: stopping" in text and "SIGTERM: saving a checkpoint" in text, text
    assert "Traceback" not in text, text[-3000:]
    assert ckpt.list_checkpoints(run / "checkpoints")
    assert not lock_path(run).exists()


def test_the_output_guard_reroutes_a_pipe_without_reader_and_retries():
    """``signals._OutputGuard``: a write and a flush to a pipe whose reader is gone raise nothing, the
    descriptor now writes to /dev/null (fd 1 and other descriptors; fd 2 moves onto a live stdout), the
    text is retried there, and the run is told once per failure (``StopSignals`` stops it once)."""
    from moe_emergence.training.signals import _OutputGuard

    read_end, write_end = os.pipe()
    os.close(read_end)
    told = []
    with open(write_end, "w", buffering=1) as stream:  # line-buffered: the write itself reaches the pipe
        guard = _OutputGuard(stream, write_end, lambda: told.append(1))
        assert guard.write("step 1\n") == len("step 1\n")
        assert os.fstat(write_end).st_rdev == os.stat(os.devnull).st_rdev
        guard.write("step 2\n")
        guard.flush()
        assert told == [1]  # /dev/null reads everything: no second failure
        assert guard.encoding == stream.encoding  # the rest is the stream's


_STOP_SIGNALS_CHILD = """
import io, os, signal, sys
from moe_emergence.training.signals import StopSignals, _OutputGuard
before = sys.stdout
with StopSignals() as stop:
    assert isinstance(sys.stdout, _OutputGuard) and isinstance(sys.stderr, _OutputGuard)
    stop.request_stop("a test")
    assert stop.received == signal.SIGTERM
    os.kill(os.getpid(), signal.SIGTERM)  # the user's first SIGTERM: not an abort
    assert stop.received == signal.SIGTERM
    mine = io.StringIO()
    sys.stdout = mine  # a stream installed during the run stays
print(sys.stdout is mine, file=sys.stderr)
sys.stdout = before
with StopSignals():
    pass
stop.request_stop("after the run")  # nothing: the run is over
print("restored", sys.stdout is before, flush=True)
"""


def test_a_requested_stop_leaves_the_users_signals_and_streams_alone():
    """``StopSignals.request_stop`` (launcher gone, output reader gone) stops as SIGTERM would without sending
    one: the user's first SIGTERM after it does not abort (it says the run is already stopping; before, the
    stop's own SIGTERM was the first and a single SIGTERM killed the run without a checkpoint); leaving the
    context restores the streams it wrapped but keeps one the user installed meanwhile; after the run a request
    does nothing."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", _STOP_SIGNALS_CHILD], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    err = out.stderr.splitlines()
    assert err[:3] == [
        "a test: stopping",
        "SIGTERM: saving a checkpoint at the end of this step, then stopping (send SIGTERM again to abort "
        "without saving)",
        "SIGTERM: already stopping (send SIGTERM again to abort without saving)",
    ], out.stderr
    assert err[3:] == ["True"] and out.stdout == "restored True\n", (out.stdout, out.stderr)


def test_a_socket_without_its_reader_counts_as_broken():
    """``signals._broken``: a socket whose peer is gone reports a hang-up, not an error (journald's stdout is
    such a socket); the guard moves it onto /dev/null and the write goes through."""
    import socket

    from moe_emergence.training.signals import _broken, _OutputGuard

    ours, peer = socket.socketpair()
    assert not _broken(ours.fileno())
    peer.close()
    assert _broken(ours.fileno())
    told = []
    with open(ours.detach(), "w", buffering=1) as stream:
        guard = _OutputGuard(stream, stream.fileno(), lambda: told.append(1))
        guard.writelines(["a\n", "b\n"])
        assert told == [1] and os.fstat(stream.fileno()).st_rdev == os.stat(os.devnull).st_rdev


def test_a_hung_up_terminal_counts_as_a_reader_gone():
    """A write to a terminal that hung up (``disown`` and the window closed) fails with EIO, not
    ``BrokenPipeError``: the guard moves it onto /dev/null and the run is told, as for a pipe."""
    from moe_emergence.training.signals import _broken, _OutputGuard

    terminal, ours = os.openpty()
    os.close(terminal)
    assert _broken(ours)
    told = []
    with open(ours, "w", buffering=1) as stream:
        guard = _OutputGuard(stream, ours, lambda: told.append(1))
        guard.write("step 1\n")
        assert told == [1] and os.fstat(ours).st_rdev == os.stat(os.devnull).st_rdev


# ----------------------------------------------------------------------------- B4: nothing executes


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(folder: Path, marker: Path) -> list[str]:
    """Replace every pickle-format file of a checkpoint with a payload (torch zip files by a torch.save of
    it, plain pickles by pickle.dumps), add a legacy custom_checkpoint pickle, recompute the manifest."""
    planted = []
    (folder / "custom_checkpoint_0.pkl").write_bytes(b"")
    for f in sorted(folder.rglob("*")):
        if f.is_file() and (f.suffix in ckpt.PICKLE_SUFFIXES or f.name == ".metadata"):
            if f.suffix == ".pkl" and f.name.startswith("custom"):
                f.write_bytes(pickle.dumps(_Payload(marker)))
            else:
                torch.save({"state": _Payload(marker)}, f)
            planted.append(f.name)
    ckpt.write_manifest(folder)  # a sha256 list is no proof of origin
    return planted


def test_planted_pickle_payloads_never_run(tmp_path, capsys, cache):
    """Guarantee: no file of a checkpoint is unpickled with weights_only=False; a tampered checkpoint is one
    error line (--resume PATH) or skipped for the previous intact one (--resume auto)."""
    path = cfg_file(tmp_path, cache, train__steps=4, checkpoint__every=2, checkpoint__keep=2)
    assert run_cli(capsys, "--config", path)[0] == 0
    run = tmp_path / "runs" / "tiny"
    step4, marker = run / "checkpoints" / "step_0000004", tmp_path / "PWNED"
    names = set(os.listdir(step4))
    assert "trainer_state.json" in names and not any(n.startswith("custom_checkpoint") for n in names)
    planted = _plant(step4, marker)
    assert {"optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"} <= set(planted)
    rc, err = run_cli(capsys, "--config", path, "log.run_name=other", "--resume", step4)
    assert rc == 2
    assert_one_error_line(
        err, r"damaged or partial: .* is not a plain tensor/state pickle .*nothing in it was executed"
    )
    assert not marker.exists() and not (tmp_path / "runs" / "other").exists()
    with pytest.warns(
        UserWarning, match=r"step_0000004 \(.*not a plain tensor.*resuming from the previous good"
    ):
        rc, err = run_cli(capsys, "--config", path, "--resume", "auto")
    assert rc == 0, err
    assert not marker.exists() and (run / "checkpoints" / "step_0000004.damaged").is_dir()


def test_dcp_metadata_is_admitted_and_a_payload_in_it_is_not(tmp_path):
    """FSDP2 checkpoints hold torch.distributed.checkpoint ``.metadata`` files, which torch reads with plain
    ``pickle.load``: the scan admits a real one and refuses a planted one."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    folder = tmp_path / "pytorch_model_fsdp_0"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... a single process"
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder))
    assert (folder / ".metadata").is_file() and ckpt.unsafe_pickles(tmp_path) == []
    marker = tmp_path / "PWNED"
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    (problem,) = ckpt.unsafe_pickles(tmp_path)
    assert "pytorch_model_fsdp_0/.metadata is not a plain tensor/state pickle" in problem
    assert not marker.exists()


def test_legacy_pickled_trainer_state_still_resumes(tmp_path, cache):
    """Checkpoints written before trainer_state.json (accelerate's custom_checkpoint_*.pkl) load, with
    weights_only=True."""
    base = [f"output_dir={tmp_path}", f"data.cache_dir={cache}", "log.run_name=old", "eval.max_blocks=8"]
    train(config_from_dict(TINY, [*base, "train.stop_after=3", "checkpoint.every=3"]))
    step3 = tmp_path / "old" / "checkpoints" / "step_0000003"
    state = json.loads((step3 / "trainer_state.json").read_text())
    torch.save(state["train_state"], step3 / "custom_checkpoint_0.pkl")
    torch.save(state["sampler"], step3 / "custom_checkpoint_1.pkl")
    (step3 / "trainer_state.json").unlink()
    ckpt.write_manifest(step3)
    assert ckpt.verify_checkpoint(step3) == []
    assert train(config_from_dict(TINY, base), resume="auto").step == 6


# ----------------------------------------------------------------------------- checkpoint damage, disk full


def test_damaged_checkpoints_are_one_error_line(tmp_path, capsys, cache):
    path = cfg_file(tmp_path, cache, train__steps=4, checkpoint__every=2, checkpoint__keep=2)
    assert run_cli(capsys, "--config", path)[0] == 0
    run = tmp_path / "runs" / "tiny"
    step2, step4 = run / "checkpoints" / "step_0000002", run / "checkpoints" / "step_0000004"
    cases = [
        ("optimizer.bin", r"the optimizer state \(optimizer\.bin or optimizer_0/\) is missing"),
        ("random_states_0.pkl", r"random_states_0\.pkl is missing"),
        ("trainer_state.json", r"trainer_state\.json is missing"),
    ]
    for name, pattern in cases:
        backup = (step4 / name).read_bytes()
        (step4 / name).unlink()
        ckpt.write_manifest(step4)  # the manifest rewritten to match
        rc, err = run_cli(capsys, "--config", path, "log.run_name=other", "--resume", step4)
        assert rc == 2, name
        assert_one_error_line(err, pattern)
        (step4 / name).write_bytes(backup)
    (step4 / "meta.json").write_text("{garbage")
    ckpt.write_manifest(step4)
    rc, err = run_cli(capsys, "--config", path, "log.run_name=other", "--resume", step4)
    assert rc == 2
    assert_one_error_line(err, r"meta\.json: unreadable checkpoint metadata")
    (run / "config.yaml").write_text("model: [unclosed\n")
    rc, err = run_cli(capsys, "--config", path, "--resume", "auto")
    assert rc == 2
    assert_one_error_line(err, r"config\.yaml: unreadable run config")
    assert not (tmp_path / "runs" / "other").exists() and ckpt.verify_checkpoint(step2) == []


def test_disk_full_during_a_checkpoint(tmp_path, capsys, cache, monkeypatch):
    """Guarantee: a failed checkpoint write is one error line naming the path; its partial step_N.tmp is
    removed, the earlier checkpoints stay intact and --resume auto continues."""
    path = cfg_file(tmp_path, cache, train__steps=6, checkpoint__every=2, checkpoint__keep=3)
    run = tmp_path / "runs" / "tiny"
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if "step_0000004.tmp" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4608 vs 4502")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    rc, err = run_cli(capsys, "--config", path)
    assert rc == 2
    assert_one_error_line(err, r"cannot write checkpoint .*step_0000004\.tmp: \[enforce fail.*--resume auto")
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000002"]
    assert ckpt.verify_checkpoint(run / "checkpoints" / "step_0000002") == []
    monkeypatch.setattr(torch, "save", real_save)
    assert run_cli(capsys, "--config", path, "--resume", "auto")[0] == 0
    assert (run / "final" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- C5: bad steps


def test_spike_rule_closed_form():
    cfg = GuardConfig(spike_factor=3.0, spike_window=3)
    from moe_emergence.training.checkpoint import TrainState

    st = TrainState()
    st.loss_history = [1.0, 2.0, 3.0]  # median 2
    for lm, spike in [(6.01, True), (5.99, False)]:
        check = StepCheck(False, False, False, [], lm=lm)
        judge(check, st, cfg)
        assert (check.spike is not None) == spike and check.good != spike
    off = StepCheck(False, False, False, [], lm=1e9)
    judge(off, st, GuardConfig(spike_factor=None))
    assert off.good


def test_guard_vector_decodes_to_each_flag_and_the_lm_loss():
    """``step_flags`` -> ``StepCheck.decode``: each flag alone, the LM loss as float32 would round it, a float64
    gradient norm beyond float32's range still finite (widened, never narrowed) and a float32 inf norm not."""
    from moe_emergence.training.steps import step_flags

    def check(objective=1.0, norm=2.0, signalled=False, params_bad=False, bad=((False, False),)):
        totals = torch.tensor([2.345678901234, 0.0, 0.0, 0.0, objective], dtype=torch.float64)
        norm = norm if isinstance(norm, torch.Tensor) else torch.tensor(norm)
        flags = step_flags(
            totals, norm, signalled, torch.tensor(params_bad), torch.tensor(bad, dtype=torch.bool)
        )
        assert flags.dtype == torch.float32
        return StepCheck.decode(flags.tolist(), [7] * len(bad))

    good = check()
    assert good.finite and good.lm == torch.tensor(2.345678901234).item() and not good.signal
    assert check(objective=float("nan")).loss_bad and check(objective=float("-inf")).loss_bad
    assert check(norm=torch.tensor(float("inf"))).grad_bad and check(norm=torch.tensor(float("nan"))).grad_bad
    assert not check(norm=torch.tensor(1e300, dtype=torch.float64)).grad_bad
    assert check(norm=torch.tensor([float("inf")])).grad_bad  # a one-element norm of another shape too
    assert check(signalled=True).signal and check(signalled=True).finite
    assert (
        check(params_bad=True).params_bad and check(params_bad=1.0).params_bad
    )  # a float flag: still float32
    assert check(bad=((False, False), (False, True))).bad_layers == [(7, "aux loss")]
    assert check(bad=((True, True),)).bad_layers == [(7, "router logits")]


def test_snapshot_restores_weights_and_optimizer_exactly():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    snap = Snapshot(model, opt)
    snap.take()  # before the first step: no optimizer state yet
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(2):
        model(torch.randn(3, 5)).pow(2).sum().backward()
        opt.step()
    snap.restore()
    assert all(torch.equal(model.state_dict()[k], w0[k]) for k in w0) and not opt.state
    model(torch.randn(3, 5)).pow(2).sum().backward()
    opt.step()
    snap.take()
    w1 = {k: v.clone() for k, v in model.state_dict().items()}
    m1 = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))
    opt.state[model[0].weight]["exp_avg"].fill_(1e30)
    snap.restore()
    assert all(torch.equal(model.state_dict()[k], w1[k]) for k in w1)
    assert all(torch.equal(opt.state[p][k], m1[id(p)][k]) for p in opt.state for k in opt.state[p])


def test_snapshot_follows_replaced_parameter_data_and_optimizer_state():
    """The snapshot reuses its lookup of the live tensors only while the same objects sit at the same
    addresses: a parameter given new storage (``p.data = ...``) or an optimizer-state tensor replaced is
    found again, and restore writes into what is live now."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    snap = Snapshot(model, opt)
    snap.take()
    saved_w = model.weight.detach().clone()
    model.weight.data = torch.full((3, 4), 7.0)  # new storage, same Parameter object
    snap.take()  # snapshots the new storage
    model.weight.data.fill_(float("nan"))
    snap.restore()
    assert torch.equal(model.weight, torch.full((3, 4), 7.0)) and not torch.equal(model.weight, saved_w)
    state = opt.state[model.weight]
    state["exp_avg"] = state["exp_avg"].clone()  # a replaced state tensor
    kept = state["exp_avg"].clone()
    state["exp_avg"].fill_(1e30)
    snap.restore()
    assert torch.equal(opt.state[model.weight]["exp_avg"], kept)  # written into the live tensor
    model.bias.data = torch.arange(5.0)  # new storage of another shape: the buffers are laid out again
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no copy into a view too small for the new tensor (a resize warning)
        snap.take()
    model.bias.data.fill_(float("nan"))
    snap.restore()
    assert torch.equal(model.bias, torch.arange(5.0))
    model.bias.data = model.bias.data.view(5, 1)  # the same address, another shape: looked up again
    snap.take()
    assert snap.saved[("model", "bias")].shape == (5, 1)
    model.bias.data = torch.zeros(5, 2)  # changed after the take: restore refuses, and writes nothing
    with pytest.raises(RuntimeError, match=r"bias is \(5, 2\) torch.float32 now, \(5, 1\)"):
        snap.restore()
    assert torch.equal(model.bias, torch.zeros(5, 2))


@pytest.mark.parametrize("walked", [False, True])
def test_module_walk_is_model_parameters_and_sees_a_swapped_submodule(walked):
    """``rollback.module_tensors`` (``params_and_buffers``) yields what ``model.parameters()`` and
    ``model.buffers()`` do, in the same order (tied wte/lm_head once), and a snapshot taken after a submodule was
    swapped (walking the model itself, or given a walk made after the swap) restores into the live one, not the
    module it replaced."""
    from conftest import tiny_gpt2_config
    from transformers import GPT2LMHeadModel

    from moe_emergence.training.rollback import Snapshot, module_tensors, params_and_buffers

    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config())
    params = list(model.parameters())
    assert len(module_tensors(model, buffers=False)) == len(params)
    assert all(map(operator.is_, module_tensors(model, buffers=False), params))
    assert model.lm_head.weight is model.transformer.wte.weight
    shared = torch.nn.Linear(3, 3)
    other = torch.nn.Sequential(
        torch.nn.BatchNorm1d(3), shared, torch.nn.Sequential(shared, torch.nn.LayerNorm(3))
    )
    other.register_buffer("none", None)
    other[0].register_buffer("also_a_buffer", other[0].weight)  # listed by parameters() and by buffers()
    want = [*other.parameters(), *other.buffers()]
    assert len(module_tensors(other)) == len(want) and all(map(operator.is_, module_tensors(other), want))
    params_of, buffers_of = params_and_buffers(other)
    assert params_of + buffers_of == module_tensors(other) and len(params_of) == len(list(other.parameters()))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    snap = Snapshot(model, opt)
    snap.take()
    old = model.transformer.ln_f
    new = torch.nn.LayerNorm(old.normalized_shape)
    new.load_state_dict(old.state_dict())
    model.transformer.ln_f = new  # same shapes, new objects: the next take must find them
    opt.param_groups[0]["params"] = list(model.parameters())
    snap.take(module_tensors(model) if walked else None)  # the trainer's step hands it its own walk
    want = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        new.weight.add_(1.0)
    snap.restore()
    assert all(torch.equal(model.state_dict()[k], want[k]) for k in want)


def test_snapshot_of_mixed_dtypes_and_strided_tensors_is_exact():
    """The snapshot keeps one flat buffer per (device, dtype): bf16 and fp32 tensors, a 0-d one and a
    non-contiguous one round-trip bit for bit; ``any_nonfinite`` sees a NaN in any of them."""
    from moe_emergence.training.rollback import any_nonfinite

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    model.register_buffer("half_buf", torch.randn(5, dtype=torch.bfloat16))
    model.register_buffer("scalar", torch.tensor(3.25))
    model.weight.data = torch.randn(6, 4).t()  # a strided (transposed) parameter
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 6)).sum().backward()
    opt.step()
    snap = Snapshot(model, opt)
    snap.take()
    # torch's batched copy per list: the sources laid out as their views (float32, bf16), the strided ones apart
    assert len(snap._copies) == 3
    for views, sources in snap._copies:
        same = [v.stride() == t.stride() for v, t in zip(views, sources, strict=True)]
        assert all(same) or not any(same)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in opt.state[model.weight].items()}
    assert not any_nonfinite([*model.parameters(), *model.buffers()])
    for t in (model.weight, model.half_buf, model.scalar):
        with torch.no_grad():
            t.fill_(float("nan"))
        assert any_nonfinite([*model.parameters(), *model.buffers()])
    opt.state[model.weight]["exp_avg_sq"].fill_(-1.0)
    snap.restore()
    assert all(torch.equal(model.state_dict()[k], want[k]) for k in want)
    assert all(torch.equal(opt.state[model.weight][k], moments[k]) for k in moments)
    assert model.half_buf.dtype == torch.bfloat16 and model.weight.stride() == (1, 4)
    with torch.no_grad():  # a later take copies the values live then (its flat views are reused)
        for t in (model.weight, model.bias, model.half_buf, model.scalar):
            t.copy_(torch.randn_like(t))
    opt.state[model.weight]["exp_avg"].mul_(3.0)
    snap.take()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in opt.state[model.weight].items()}
    with torch.no_grad():
        for t in (model.weight, model.bias, model.half_buf, model.scalar):
            t.fill_(float("nan"))
    opt.state[model.weight]["exp_avg"].fill_(float("nan"))
    snap.restore()
    assert all(torch.equal(model.state_dict()[k], want[k]) for k in want)
    assert all(torch.equal(opt.state[model.weight][k], moments[k]) for k in moments)


@pytest.mark.parametrize(
    "overrides",
    [
        ("optim.lr=1e10", "optim.grad_clip=null"),
        ("model.upcycle_at_step=0", "optim.lr=1e4"),
    ],
    ids=["lr-1e10", "upcycled-lr-1e4"],
)
def test_guard_never_saves_exploded_weights(tmp_path, capsys, cache, overrides):
    """Guarantee: the guard's stop checkpoint holds the last verified-good weights (never non-finite or
    exploded ones), names where the values went bad, and a resume with a lower optim.lr continues past the
    bad steps without applying them again."""
    path = cfg_file(tmp_path, cache, train__steps=12, guard__max_consecutive_skips=2, checkpoint__every=0)
    with pytest.warns(UserWarning, match="at step"):
        rc, err = run_cli(capsys, "--config", path, *overrides)
    assert rc == 4
    assert_one_error_line(
        err, r"2 consecutive optimizer steps skipped .*the first bad values were at step \d+: "
    )
    assert "verified-good weights" in err
    run = tmp_path / "runs" / "tiny"
    (stop,) = ckpt.list_checkpoints(run / "checkpoints")
    weights = load_file(stop / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert max(float(t.abs().max()) for t in weights.values()) < 10.0  # GPT-2 init scale, not 1e4..5e9
    stopped_at = int(stop.name.removeprefix("step_"))
    rc, err = run_cli(capsys, "--config", path, *overrides, "optim.lr=1e-3", "--resume", "auto")
    assert rc == 0, err
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r]
    assert steps == list(range(1, 13))  # continued after the stop step: the bad steps are not replayed
    after = [r for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r and r["step"] > stopped_at]
    assert all(isinstance(r["train/lm_loss"], float) for r in after[1:])
    final = load_file(run / "final" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in final.values())


# ----------------------------------------------------------------------------- found by a fresh review


@pytest.mark.parametrize("name", ["x" * 129, "é" * 65, "run.replaced"])
def test_run_name_length_and_reserved_suffix(tmp_path, capsys, cache, name):
    rc, err = run_cli(capsys, "--config", cfg_file(tmp_path, cache), f"log.run_name={name}")
    assert rc == 2
    assert_one_error_line(err, r"log\.run_name=.* is invalid: one plain folder name of at most 128 bytes")


def test_a_symlinked_name_shares_the_lock_and_overwrite_refuses_links(tmp_path, capsys, cache):
    path = cfg_file(tmp_path, cache, train__steps=400, checkpoint__every=2, log__every=1)
    runs, log = tmp_path / "runs", tmp_path / "live.log"
    proc = _launch([sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(path)], log)
    try:
        _wait(lambda: _steps(runs / "tiny") >= 2, proc, log)
        (runs / "alias").symlink_to(runs / "tiny")
        rc, err = run_cli(capsys, "--config", path, "log.run_name=alias", "--resume", "auto")
        assert rc == 2
        assert_one_error_line(err, rf"run folder '.*alias' is in use by process {proc.pid}")
    finally:
        proc.kill()
        proc.wait(timeout=60)
    rc, err = run_cli(capsys, "--config", path, "log.run_name=alias", "--overwrite")
    assert rc == 2
    assert_one_error_line(err, r"alias' is a symbolic link, not a run folder")
    assert (runs / "tiny" / "metrics.jsonl").is_file()


def test_overwrite_looks_inside_checkpoints_final_and_tokenizer(tmp_path, capsys, cache):
    path = cfg_file(tmp_path, cache, train__steps=1, model__upcycle_at_step=0)
    assert run_cli(capsys, "--config", path)[0] == 0
    run = tmp_path / "runs" / "tiny"
    (run / "checkpoints" / "step_0000009.tmp").mkdir()
    (run / "wandb").mkdir()
    assert (run / "summary.md").is_file() and (run / "plots").is_dir()  # a finished run's summary
    user_files = ["checkpoints/mynotes.txt", "final/notes.md", "tokenizer/mine.txt", "final/README.md"]
    user_files += ["plots/notes.txt"]
    user_files += [
        "checkpoints/step_0000001/x.txt",
        "checkpoints/step_0000009.tmp/notes.txt",
        "wandb/notes.txt",
    ]
    for rel in user_files:
        (run / rel).write_text("mine")
        rc, err = run_cli(capsys, "--config", path, "--overwrite")
        assert rc == 2, rel
        assert_one_error_line(err, rf"also holds files a run does not write: {rel}")
        assert (run / rel).read_text() == "mine"
        (run / rel).unlink()


def _rewrite(folder: Path, name: str, edit) -> None:
    data = json.loads((folder / name).read_text())
    edit(data)
    (folder / name).write_text(json.dumps(data))
    if name != ckpt.MANIFEST:
        ckpt.write_manifest(folder)


def test_tampered_checkpoint_values_are_one_error_line(tmp_path, capsys, cache):
    """Manifest paths outside the folder, special files, wrong types and ranges in the trainer state and
    metadata, garbage weights, NaN weights: one error line each, never a hang, a traceback or a wrong run."""
    path = cfg_file(tmp_path, cache, train__steps=6, checkpoint__every=3, checkpoint__keep=2)
    assert run_cli(capsys, "--config", path)[0] == 0
    run = tmp_path / "runs" / "tiny"
    step6 = run / "checkpoints" / "step_0000006"
    pristine = {f.name: f.read_bytes() for f in step6.iterdir()}
    tokenizer_before = listing(run / "tokenizer"), (run / "tokenizer" / "tokenizer_config.json").read_text()

    def restore():
        for f in step6.iterdir():
            if f.name not in pristine:
                f.unlink()
        for name, data in pristine.items():
            (step6 / name).write_bytes(data)

    def manifest_entry(rel):
        return lambda m: m["files"].update({rel: {"size": 0, "sha256": hashlib.sha256(b"").hexdigest()}})

    state, meta = "trainer_state.json", "meta.json"
    cases = [
        (
            lambda: _rewrite(step6, state, lambda d: d["train_state"].update(step=-5)),
            r"train_state\.step=-5 is invalid",
        ),
        (
            lambda: _rewrite(step6, state, lambda d: d["sampler"].update(offset=-1)),
            r"sampler\.offset=-1 is invalid",
        ),
        (
            lambda: _rewrite(step6, state, lambda d: d["sampler"].update(seed="a")),
            r"sampler\.seed='a' is invalid",
        ),
        (
            lambda: _rewrite(step6, state, lambda d: d["train_state"].update(step=10**30)),
            r"train_state\.step=10+ is invalid: an integer in",
        ),
        (
            lambda: _rewrite(step6, state, lambda d: d["sampler"].update(offset=10**5)),
            r"sampler\.offset=100000 is beyond",
        ),
        (
            lambda: _rewrite(step6, state, lambda d: d["sampler"].update(seed=5)),
            r"sampler\.seed=5 is not train\.seed=0",
        ),
        (
            lambda: _rewrite(step6, state, lambda d: d["sampler"].update(epoch=10**21)),
            r"sampler\.epoch=10+ is invalid",
        ),
        (
            lambda: _rewrite(step6, state, lambda d: d["train_state"].update(loss_history=[10**400])),
            r"loss_history must be",
        ),
        (
            lambda: _rewrite(step6, state, lambda d: d["train_state"].update(consecutive_skips=99)),
            r"consecutive_skips <= skipped_steps",
        ),
        (lambda: (step6 / "sub").symlink_to("/etc"), r"sub is a symbolic link"),
        (
            lambda: _rewrite(step6, state, lambda d: d["train_state"].update(loss_history=["x"])),
            r"loss_history must be",
        ),
        (
            lambda: _rewrite(step6, state, lambda d: d["train_state"].update(collapse_streak=None)),
            r"collapse_streak must",
        ),
        (
            lambda: _rewrite(step6, meta, lambda d: d.update(num_processes="x")),
            r"num_processes='x' is invalid",
        ),
        (
            lambda: _rewrite(step6, meta, lambda d: d.update(num_processes=10**6)),
            r"num_processes=1000000 is invalid",
        ),
        (
            lambda: _rewrite(step6, meta, lambda d: d.update(step=3)),
            r"trainer_state\.json is at step 6, its meta\.json at step 3",
        ),
        (
            lambda: _rewrite(step6, "manifest.json", manifest_entry("../../../../etc/hostname")),
            r"not a path inside the checkpoint",
        ),
        (
            lambda: (os.mkfifo(step6 / "pipe"), _rewrite(step6, "manifest.json", manifest_entry("pipe"))),
            r"pipe is not a regular file",
        ),
        (
            lambda: ((step6 / "link").symlink_to("/etc/hostname"), ckpt.write_manifest(step6)),
            r"link is a symbolic link",
        ),
        (
            lambda: ((step6 / "model.safetensors").write_bytes(b"\xff" * 64), ckpt.write_manifest(step6)),
            r"model\.safetensors is not a readable safetensors file",
        ),
    ]
    for tamper, pattern in cases:
        tamper()
        argv = ["--config", str(path), "log.run_name=other", "--resume", str(step6)]
        if "pipe" in pattern or "inside" in pattern:  # a hang here must time out, not block the suite
            cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *argv]
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
            rc, err = proc.returncode, proc.stderr
        else:
            rc, err = run_cli(capsys, *argv)
        assert rc == 2, (pattern, err[-2000:])
        assert_one_error_line(err, pattern)
        assert not (tmp_path / "runs" / "other").exists()
        restore()
    from safetensors.torch import save_file

    weights = load_file(step6 / "model.safetensors")
    name = next(k for k in weights if "router" in k and weights[k].is_floating_point())
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, step6 / "model.safetensors")
    ckpt.write_manifest(step6)
    rc, err = run_cli(capsys, "--config", path, "log.run_name=other", "--resume", step6)
    assert rc == 2
    assert_one_error_line(err, r"holds non-finite values \(parameter .*router.*\)")
    # a failed resume of the run itself leaves its tokenizer/ alone
    rc, err = run_cli(capsys, "--config", path, "train.steps=9", "--resume", step6)
    assert rc == 2
    assert (
        listing(run / "tokenizer"),
        (run / "tokenizer" / "tokenizer_config.json").read_text(),
    ) == tokenizer_before


def test_no_rollback_never_claims_verified_weights(tmp_path, capsys, cache):
    """guard.snapshot_every=0: a bad step cannot be undone, so the exploded weights are never written and
    the message says so."""
    path = cfg_file(tmp_path, cache, train__steps=12, guard__max_consecutive_skips=2, checkpoint__every=3)
    overrides = ("guard.snapshot_every=0", "optim.lr=1e10", "optim.grad_clip=null")
    with pytest.warns(UserWarning, match="at step"):
        rc, err = run_cli(capsys, "--config", path, *overrides)
    assert rc == 4
    assert_one_error_line(err, r"The weights are not known to be good, so no checkpoint was written")
    run = tmp_path / "runs" / "tiny"
    for step in ckpt.list_checkpoints(run / "checkpoints"):
        w = load_file(step / "model.safetensors")
        assert max(float(t.abs().max()) for t in w.values()) < 10.0, step.name
    assert not (run / "final").exists()


def test_planted_lock_files_and_run_entries_are_refused(tmp_path, capsys, cache):
    """A symlink or FIFO where the lock file goes is never written through; a FIFO config.yaml never blocks."""
    path = cfg_file(tmp_path, cache, train__steps=3, checkpoint__every=1)
    runs = tmp_path / "runs"
    runs.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (runs / ".tiny.lock").symlink_to(victim)
    rc, err = run_cli(capsys, "--config", path)
    assert rc == 2
    assert_one_error_line(err, r"cannot use the lock file .*\.tiny\.lock \(it is a symbolic link\)")
    assert victim.read_text() == "precious"
    (runs / ".tiny.lock").unlink()
    os.mkfifo(runs / ".tiny.lock")
    rc, err = run_cli(capsys, "--config", path)
    assert rc == 2
    assert_one_error_line(err, r"the lock file .*\.tiny\.lock is not a regular file")
    (runs / ".tiny.lock").unlink()
    assert run_cli(capsys, "--config", path, "train.stop_after=1")[0] == 0
    (runs / "tiny" / "config.yaml").unlink()
    os.mkfifo(runs / "tiny" / "config.yaml")
    rc, err = run_cli(capsys, "--config", path, "--resume", "auto")
    assert rc == 2
    assert_one_error_line(err, r"config\.yaml is not a regular file")


def test_gradient_norm_overflows_as_torch_whatever_the_split():
    """``steps.clip_grad_norm_`` gives torch's norm and clipped gradients also where torch's sum of squares
    overflows (float32 gradients of 1.5e19: inf, nothing kept) whether the values sit in one tensor or
    three, and for mixed float32/bfloat16 gradients; float64 gradients get a float64 norm; ``any_nonfinite``
    does not call a large float64 value non-finite."""
    from moe_emergence.training.rollback import any_nonfinite
    from moe_emergence.training.steps import clip_grad_norm_

    def params(grads):
        out = []
        for g in grads:
            p = torch.nn.Parameter(torch.zeros_like(g))
            p.grad = g.clone()
            out.append(p)
        return out

    big = torch.tensor([1.5e19])
    for grads in (
        [big, big, big],
        [big.repeat(3)],
        [torch.tensor([3.0, 4.0]), torch.tensor([12.0]).bfloat16()],
    ):
        ours, ref = params(grads), params(grads)
        norm = clip_grad_norm_(ours, 1.0, lambda x: x)
        want = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        torch.testing.assert_close(norm, want.float(), equal_nan=True)  # float32 for bfloat16 gradients too
        for a, b in zip(ours, ref, strict=True):
            torch.testing.assert_close(a.grad, b.grad, equal_nan=True)
    huge = params(
        [torch.tensor([1e300], dtype=torch.float64)]
    )  # float64 gradients: a float64 norm, as torch's
    assert clip_grad_norm_(huge, 1.0, lambda x: x).item() == 1e300 and huge[0].grad.item() == pytest.approx(
        1.0
    )
    assert not any_nonfinite([torch.tensor([1e300], dtype=torch.float64), torch.ones(2)])


def test_nonfinite_check_sees_complex_and_ignores_integer_tensors():
    """Complex tensors can hold a NaN/Inf and are checked; integer and bool tensors cannot and are left out (no
    error for a model's integer buffers)."""
    from moe_emergence.training.rollback import any_nonfinite

    ints = [torch.arange(4), torch.ones(3, dtype=torch.bool)]
    assert not any_nonfinite([*ints, torch.ones(2, dtype=torch.complex64)])
    assert any_nonfinite([*ints, torch.tensor([1 + 0j, complex(float("nan"), 0.0)])])
    assert any_nonfinite([torch.ones(2), torch.tensor([complex(0.0, float("inf"))])])
    assert not any_nonfinite(ints)


def test_nonfinite_check_skips_empty_shards():
    """FSDP2 gives a process an empty shard of a parameter with fewer rows than processes (experts
    ``[E, ...]`` with E < processes): the check ignores it, and still sees a NaN elsewhere."""
    from moe_emergence.training.rollback import any_nonfinite

    assert not any_nonfinite([torch.empty(0, 4), torch.ones(3)])
    assert any_nonfinite([torch.empty(0, 4), torch.tensor([1.0, float("nan")])])
    assert not any_nonfinite([torch.empty(0)])


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
    ],
)
@pytest.mark.parametrize("check", ["_nonfinite_in_place", "_nonfinite_by_norm", "any_nonfinite"])
def test_nonfinite_checks_agree_with_isfinite_and_write_nothing_new(check, device):
    """Both finite checks ``any_nonfinite`` picks from (in place on a GPU, by norm elsewhere), each on the CPU and
    on a GPU, and ``any_nonfinite`` itself: > 0 exactly when ``torch.isfinite`` finds a NaN/Inf, over mixed float
    dtypes, transposed and sliced tensors, values up to half each dtype's largest, expanded views (elements sharing
    memory), complex tensors and a lazily negated view; every value keeps its bits (a NaN stays a NaN) and every tensor its version
    counter."""
    from moe_emergence.training import rollback

    fn = getattr(rollback, check)
    g = torch.Generator().manual_seed(0)
    for case in range(300):
        tensors = []
        for i in range(int(torch.randint(1, 7, (), generator=g))):
            dtype = [torch.float32, torch.bfloat16, torch.float16, torch.float64][(case + i) % 4]
            t = torch.randn(5, 7, generator=g).clamp(-4, 4).to(device, dtype) * (torch.finfo(dtype).max / 8)
            t = [t, t.t(), t[1:, ::2]][(case + 2 * i) % 3]
            tensors.append(t)
        bad = case % 3 != 0
        if bad:  # one NaN, +inf or -inf somewhere
            target = tensors[int(torch.randint(0, len(tensors), (), generator=g))]
            flat = int(torch.randint(0, target.numel(), (), generator=g))
            value = [float("nan"), float("inf"), float("-inf")][case % 3 - 1 + (case // 3) % 2]
            target[flat // target.shape[1], flat % target.shape[1]] = value
        if case % 4 == 1:  # finite extras: an expanded view (a write into it is refused) and a complex tensor
            tensors.append(torch.full((1,), 3.0, device=device, dtype=tensors[0].dtype).expand(6))
            tensors.append(torch.randn(3, generator=g, dtype=torch.complex64).to(device))
            tensors.append(tensors[-1].conj().imag)  # a lazily negated float32 view: no write into it
        before = [(t.clone(), t._version) for t in tensors]
        found = fn(tensors)
        assert found.shape == () and found.dtype == (
            torch.bool if check == "any_nonfinite" else torch.float32
        )
        assert found.device == tensors[0].device
        assert bool(found > 0) == (not all(bool(torch.isfinite(t).all()) for t in tensors)) == bad, case
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}
        for t, (copy, version) in zip(tensors, before, strict=True):
            if t.is_complex():
                t, copy = torch.view_as_real(t), torch.view_as_real(copy)
            as_int, nan = bits[t.element_size()], copy.isnan()
            assert torch.equal(t.isnan(), nan)  # a NaN stays a NaN (bfloat16 on the CPU: its bits may change)
            assert torch.equal(t[~nan].contiguous().view(as_int), copy[~nan].contiguous().view(as_int))
            assert t._version == version


def test_fused_adamw_stays_fused_after_loading_an_older_foreach_state():
    """A checkpoint of the old default AdamW (foreach, step counts on the CPU) loads into the trainer's
    optimizer without turning the fused kernel off, and continues as that AdamW would."""
    from moe_emergence.training.optim import ShardLocalAdamW

    def model_and_grads():
        torch.manual_seed(0)
        m = torch.nn.Linear(5, 3)
        return m, [torch.randn_like(p) for p in m.parameters()]

    old, grads = model_and_grads()
    foreach = torch.optim.AdamW(old.parameters(), lr=0.1, weight_decay=0.1, foreach=True)
    for _ in range(2):
        for p, g in zip(old.parameters(), grads, strict=True):
            p.grad = g.clone()
        foreach.step()
    saved = foreach.state_dict()
    new, _ = model_and_grads()
    new.load_state_dict(old.state_dict())
    opt = ShardLocalAdamW(new.parameters(), lr=0.1, weight_decay=0.1, fused=True)
    opt.load_state_dict(saved)
    assert all(g["fused"] is True and not g["foreach"] for g in opt.param_groups)
    assert all(opt.state[p]["step"].device == p.device for p in new.parameters())
    for model, o in ((old, foreach), (new, opt)):
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g.clone()
        o.step()
    for a, b in zip(old.parameters(), new.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert opt.state_dict()["param_groups"][0]["fused"] is True


def test_fp16_scaler_survives_a_step_rejected_with_finite_gradients():
    """fp16: the trainer unscales every step's gradients before judging it; a step the guard rejects for
    another reason (a loss spike, non-finite parameters) takes no optimizer step, yet the GradScaler must be
    closed (update) or the next unscale_ raises. Run on the CPU with accelerate's fp16 state set by hand
    (accelerate refuses fp16 on a CPU)."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    acc.native_amp = True
    was = acc.state._mixed_precision
    acc.state._mixed_precision = "fp16"  # the process-wide state: restored at the end
    try:
        _rejected_step_then_a_good_one(acc)
    finally:
        acc.state._mixed_precision = was


def _rejected_step_then_a_good_one(acc) -> None:
    from types import SimpleNamespace

    from moe_emergence.training.guard import StepCheck
    from moe_emergence.training.optim import ShardLocalAdamW
    from moe_emergence.training.rollback import VerifiedState, module_tensors
    from moe_emergence.training.trainer import Trainer

    acc.scaler.scale(torch.ones(()))  # creates the scale tensor, as the backward's scaler.scale(loss) does
    model = acc.prepare(torch.nn.Linear(4, 2))
    opt = acc.prepare(ShardLocalAdamW(model.parameters(), lr=0.1, fused=True))
    trainer = SimpleNamespace(
        accelerator=acc, optimizer=opt, verified=VerifiedState(model, opt, 1, lambda x: x), step_graph=None
    )

    def step(check: StepCheck) -> None:
        for p in model.parameters():
            p.grad = torch.ones_like(p) * acc.scaler.get_scale()
        acc.unscale_gradients()
        Trainer._apply_or_roll_back(trainer, check, module_tensors(model))

    step(StepCheck(False, False, False, []))  # good
    rejected = StepCheck(False, False, False, [], spike="a loss spike")  # finite gradients
    assert not rejected.good and not rejected.grad_bad
    step(rejected)  # no optimizer step, rolled back
    before = [p.detach().clone() for p in model.parameters()]
    step(StepCheck(False, False, False, []))  # the next step unscales again and is taken
    assert not any(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_snapshot_of_a_model_without_floating_tensors():
    """Nothing to copy (integer buffers only, no parameters): take and restore do nothing, without error."""
    model = torch.nn.Module()
    model.register_buffer("counts", torch.arange(3))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(0))], lr=0.1)
    snap = Snapshot(model, opt)
    snap.take()
    model.counts.add_(1)
    snap.restore()
    assert snap.taken and torch.equal(model.counts, torch.arange(3) + 1)  # not floating: never copied
