"""scripts/bench_host.py on the CPU: its refusals are one ``error:`` line and exit status 2, before any GPU work.
The GPU measurement itself is not run here."""

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
        (
            ["--json", "/no/such/folder/x.json"],
            "--json /no/such/folder/x.json: a JSON file in an existing folder",
        ),
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
