"""The peers of ``scripts/bench_peers.py`` (issue 20 item 4), for comparison only, not this project's backends:
a Hugging Face transformers-style grouped_mm experts function, and ScatterMoE v0.3 (github.com/shawntan/scattermoe,
Apache-2.0) called as its ``scattermoe.mlp.MLP`` does, from a git-ignored copy of its package (never committed).
Each is called as ``fn(x_TD, w1, b1, w2, b2, indices_TK, weights_TK, activation) -> y_TD`` (shape legend:
docs/architecture.md; A = T*K assignments, S the same sorted by expert)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_moe import user_error  # scripts/ on path

ROOT = Path(__file__).resolve().parent.parent
SCATTERMOE_DIR = ROOT / ".gl" / "scattermoe"  # the package directory itself: .gl/scattermoe/__init__.py


# --- peer: Hugging Face transformers-style grouped_mm experts (for comparison only) ---------------------------


def expert_counts(expert_A: torch.Tensor, E: int) -> torch.Tensor:
    """Rows of each expert by ``torch.histc`` as transformers does (bincount syncs with the host: no CUDA graph);
    histc takes int on CUDA, float on the CPU."""
    ids = expert_A.int() if expert_A.is_cuda else expert_A.float()
    return torch.histc(ids, bins=E, min=0, max=E - 1)


def hf_grouped_mm_experts(x_TD, w1_EDF, b1_EF, w2_EFD, b2_ED, indices_TK, weights_TK, activation):
    """PEER, written after transformers 5's ``grouped_mm_experts_forward`` (``is_transposed=True``: our [in, out]
    layout); not this project's backend. ``activation`` is GELU-tanh in this benchmark."""
    T, K = indices_TK.shape
    E = w1_EDF.shape[0]
    expert_S, perm_S = torch.sort(indices_TK.reshape(-1))
    x_SD = x_TD[perm_S // K]
    w_S = weights_TK.reshape(-1)[perm_S]
    offs_E = torch.cumsum(expert_counts(expert_S, E), dim=0, dtype=torch.int32)
    h_SF = torch._grouped_mm(x_SD, w1_EDF, offs=offs_E)
    h_SF.add_(b1_EF[expert_S])  # bias gathered per row (grouped_mm takes no bias)
    h_SF = F.gelu(h_SF, approximate="tanh")
    o_SD = torch._grouped_mm(h_SF, w2_EFD, offs=offs_E)
    o_SD.add_(b2_ED[expert_S])
    o_SD = o_SD * w_S[:, None]  # float32 weights: float32 rows, summed over K in float32
    inv_S = torch.empty_like(perm_S)
    inv_S[perm_S] = torch.arange(perm_S.numel(), device=perm_S.device)
    return o_SD[inv_S].view(T, K, -1).sum(1).to(x_TD.dtype)


# --- peer: ScatterMoE ------------------------------------------------------------------------------------------


def to_scattermoe(w1_EDF, b1_EF, w2_EFD, b2_ED):
    """Our stacked GPT-2 Conv1D weights ([in, out] per expert) in ScatterMoE's ``ParallelExperts`` layout
    (``weight`` [E, out, in], ``bias`` [E, out]), contiguous: (weight1 [E, F, D], b1, weight2 [E, D, F], b2)."""
    return (w1_EDF.transpose(1, 2).contiguous(), b1_EF, w2_EFD.transpose(1, 2).contiguous(), b2_ED)


def from_scattermoe(weight1_EFD, b1_EF, weight2_EDF, b2_ED):
    """Inverse of ``to_scattermoe`` (also maps its weight gradients back to our layout)."""
    return (weight1_EFD.transpose(1, 2), b1_EF, weight2_EDF.transpose(1, 2), b2_ED)


def load_scattermoe():
    """ScatterMoE from ``SCATTERMOE_DIR``; exits with one ``error:`` line where it is missing."""
    if not (SCATTERMOE_DIR / "__init__.py").is_file():
        user_error(
            f"ScatterMoE not found: put its Python package (github.com/shawntan/scattermoe v0.3, the scattermoe/ "
            f"folder) at {SCATTERMOE_DIR}/ (git-ignored; carry it to the GPU machine)"
        )
    sys.path.insert(0, str(SCATTERMOE_DIR.parent))
    return importlib.import_module("scattermoe")


def scattermoe_experts(sm, histc: bool = False):
    """Experts function over ScatterMoE-layout weights (``to_scattermoe``), as ``scattermoe.mlp.MLP.forward``
    with biases; ``histc``: the sort/count without ScatterMoE's bincount (the ``scattermoe_histc`` variant)."""

    def sort_count(indices_TK, E):
        if not histc:
            return sm.flatten_sort_count(indices_TK, num_experts=E)
        expert_A, scattered_A = torch.sort(indices_TK.flatten())
        return expert_A, scattered_A, expert_counts(expert_A, E).cumsum(-1)

    def fn(x_TD, weight1_EFD, b1_EF, weight2_EDF, b2_ED, indices_TK, weights_TK, activation):
        K = indices_TK.shape[1]
        expert_A, scattered_A, offsets_E = sort_count(indices_TK, weight1_EFD.shape[0])
        h = sm.parallel_linear(
            x_TD, weight1_EFD.permute(0, 2, 1), K, expert_A, scattered_A, offsets_E,
            expert_biases=b1_EF, grouped_out=True,
        )  # fmt: skip
        h = F.gelu(h, approximate="tanh")
        return sm.parallel_linear(
            h, weight2_EDF.permute(0, 2, 1), 1, expert_A, scattered_A, offsets_E,
            expert_biases=b2_ED, gates=weights_TK.to(h.dtype), grouped_in=True,
        )  # fmt: skip

    return fn
