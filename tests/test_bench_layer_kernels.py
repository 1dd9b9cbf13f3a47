"""scripts/bench_layer_kernels.py's routings on the CPU (the timing needs a GPU): each token gets K distinct
experts, and each kind has the per-expert counts it promises (issue 20 item 3: skew against partly filled tiles)."""

import pytest
import torch
from _scripts import load_script


@pytest.fixture(scope="module")
def blk():
    return load_script("bench_layer_kernels")


def _counts(idx, E):
    return torch.bincount(idx.flatten(), minlength=E)


@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("kind", ["balanced", "zipf", "zipf-aligned", "balanced-unaligned"])
def test_routings_give_distinct_experts_and_normalised_weights(blk, kind, K):
    T, E = 8192, 8
    idx, w = blk.routing(T, E, K, kind, torch.Generator().manual_seed(0))
    assert idx.shape == (T, K) and w.shape == (T, K) and idx.dtype == torch.long
    assert int(idx.min()) >= 0 and int(idx.max()) < E
    assert all(len(set(row)) == K for row in idx.tolist())  # K distinct experts per token
    torch.testing.assert_close(w.sum(1), torch.ones(T, dtype=w.dtype))
    assert int(_counts(idx, E).sum()) == T * K


@pytest.mark.parametrize("shape", [("gpt2", 1), ("gpt2", 2), ("e64", 8), ("e128", 8)])
def test_the_diagnostic_routings_have_the_counts_they_promise(blk, shape):
    E, _F, Ks, T = blk.SHAPES[shape[0]]
    K, tile = shape[1], blk.ROW_TILE
    assert K in Ks
    count = lambda kind: _counts(blk.routing(T, E, K, kind, torch.Generator().manual_seed(0))[0], E)  # noqa: E731
    assert count("balanced").tolist() == [T * K // E] * E  # full tiles only (T*K/E a multiple of the tile)
    zipf, aligned = count("zipf"), count("zipf-aligned")
    assert all(c % tile == 0 for c in aligned.tolist())  # every row tile full
    assert int(aligned.argmax()) == int(zipf.argmax()) == 0 and aligned[0] > 2 * aligned[-1]  # skewed alike
    assert (aligned - zipf)[1:].abs().max() <= tile // 2  # the others rounded to the nearest tile
    unaligned = count("balanced-unaligned")
    assert unaligned.tolist() == [T * K // E + d for d in [-tile // 2, tile // 2] * (E // 2)]
    assert all(c % tile == tile // 2 for c in unaligned.tolist())  # every expert's last tile half full


def test_routing_mistakes_raise(blk):
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="even E"):
        blk.routing(1024, 7, 1, "balanced-unaligned", gen)
    with pytest.raises(ValueError, match="one of"):
        blk.routing(1024, 8, 1, "uniform", gen)
    with pytest.raises(ValueError, match="summing to"):
        blk.from_counts(torch.tensor([600, 300]), 1000, 1, gen)
    with pytest.raises(ValueError, match=r"in \[0, T=100\]"):
        blk.from_counts(torch.tensor([150, 50]), 100, 2, gen)  # an expert twice for some token


def test_mistakes_and_a_missing_gpu_are_one_error_line(blk, capsys):
    """Bad options, --memory with the options it ignores, and no CUDA device (this machine): one ``error:`` line,
    exit 2, no traceback."""
    from moe_emergence.errors import run_cli

    for argv, why in (
        (["--shape", "bogus"], "--shape"),
        (["--memory", "--shape", "e64"], "--memory measures its own shapes"),
        (["--memory", "--routing", "zipf"], "drop --shape and --routing"),
        (["--kernels", "--shape", "e64"], "needs a CUDA device"),
    ):
        assert run_cli(blk.main, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and why in err[0], (argv, err)
