"""GPT-2's LM head with its GEMMs on a vocabulary padded to a multiple of 64.

GPT-2's vocabulary has V = 50257 tokens, an odd number: the logits ``[T, V]`` then have a row stride that no
16-byte vector load can follow, and cuBLAS runs its slow align-1 kernels for the head's three GEMMs (forward,
and the input and weight gradients). Uncompiled, bf16 autocast, on an H200 at B=8, S=512 that is 7.86 ms of the
21.64 ms of device time of a GPT-2-small training step (docs/benchmarks.md, 2026-12-04). ``AlignedLMHead``
multiplies by the weight zero-padded to U rows (U = V rounded up to ``pad_to``) and returns the first V columns
of the product, copied to a contiguous ``[..., V]`` tensor: ``nn.Linear``'s logits and gradients (the padded
columns are dropped, so their gradient is zero and the weight's gradient is that of its V real rows; equal up
to the rounding of another GEMM kernel), through aligned kernels (16.17 ms a step). It pads only on the devices
of ``pad_on`` (default CUDA: on 2 CPU cores the padding made the head slower, docs/benchmarks/
lm_head_h200_2026-12-04.log) and not under ``torch.compile`` (any backend: Inductor, the trainer's, pads such
GEMMs itself; the others run ``nn.Linear``'s unaligned GEMMs).

The module is an ``nn.Linear`` (same parameters, state-dict keys and initialisation), so transformers ties its
weight to the input embeddings as it ties GPT-2's; ``align_lm_head`` swaps it into a model. transformers'
``resize_token_embeddings`` keeps it for a tied head and puts back an ``nn.Linear`` for an untied one. Shapes:
docs/architecture.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# the vocabulary padding of nanoGPT (50304 = 786 * 64) and of Megatron's make-vocab-size-divisible
PAD_TO = 64
_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)  # what autocast casts (never float64)


def _check_pad_to(pad_to) -> None:
    if isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < 1:
        raise ValueError(f"pad_to must be a positive int, got {pad_to!r}")


def padded_linear(
    x_BSD: torch.Tensor, w_VD: torch.Tensor, b_V: torch.Tensor | None, pad_to: int
) -> torch.Tensor:
    """``F.linear(x_BSD, w_VD, b_V)`` ``[..., V]`` (contiguous) computed as ``F.linear`` on ``w_VD`` and ``b_V``
    zero-padded to U rows, the smallest multiple of ``pad_to`` >= V, and the first V output columns kept. Under
    autocast a weight autocast would cast is cast before it is padded (autocast would cast the padded copy).
    Raises ``ValueError`` unless ``pad_to`` is a positive int."""
    _check_pad_to(pad_to)
    V = w_VD.shape[0]
    pad = -V % pad_to
    device = w_VD.device.type
    if torch.is_autocast_enabled(device) and w_VD.dtype in _AUTOCAST_CASTS:
        dtype = torch.get_autocast_dtype(device)
        w_VD, b_V = w_VD.to(dtype), None if b_V is None else b_V.to(dtype)
    w_UD = F.pad(w_VD, (0, 0, 0, pad))
    b_U = None if b_V is None else F.pad(b_V, (0, pad))
    return F.linear(x_BSD, w_UD, b_U)[..., :V].contiguous()


class AlignedLMHead(nn.Linear):
    """``nn.Linear(D, V)`` whose forward multiplies by its weight zero-padded to ``U = ceil(V / pad_to) * pad_to``
    rows and keeps the first V output columns (module docstring), where ``pads()`` says so. ``pad_to``: a
    positive int; ``pad_on``: the device types it pads on. Raises ``ValueError`` for a ``pad_to`` that is not a
    positive int."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        pad_to: int = PAD_TO,
        pad_on: tuple[str, ...] = ("cuda",),
        **kw,
    ) -> None:
        _check_pad_to(pad_to)
        super().__init__(in_features, out_features, bias=bias, **kw)
        self.pad_to, self.pad_on = pad_to, tuple(pad_on)

    def pads(self) -> bool:
        """Whether ``forward`` pads: V is not a multiple of ``pad_to``, the weight is on a device of ``pad_on``,
        and ``torch.compile`` is not tracing."""
        return (
            self.out_features % self.pad_to != 0
            and self.weight.device.type in self.pad_on
            and not torch.compiler.is_compiling()
        )

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """``x_BSD`` ``[..., D]`` -> logits ``[..., V]``, ``x @ weight.T (+ bias)``: ``padded_linear`` where
        ``pads()``, else ``nn.Linear``'s."""
        if not self.pads():
            return super().forward(x_BSD)
        return padded_linear(x_BSD, self.weight, self.bias, self.pad_to)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pad_to={self.pad_to}, pad_on={self.pad_on}"


def align_lm_head(model: nn.Module, pad_to: int = PAD_TO) -> None:
    """Replace ``model.lm_head`` (an ``nn.Linear``) by an ``AlignedLMHead`` holding the same parameter objects
    (a weight tied to the input embeddings stays tied), in the same train/eval mode and marked initialised as it
    was (transformers' ``post_init`` then draws no new weights for it). Hooks registered on the old head are not
    carried over. A no-op when it already is one. Raises ``TypeError`` for a head that is not exactly an
    ``nn.Linear``, ``ValueError`` for a bad ``pad_to``."""
    head = model.lm_head
    if isinstance(head, AlignedLMHead):
        return
    if type(head) is not nn.Linear:
        raise TypeError(f"align_lm_head: model.lm_head is a {type(head).__name__}, not an nn.Linear")
    aligned = AlignedLMHead(
        head.in_features, head.out_features, bias=head.bias is not None, pad_to=pad_to, device="meta"
    )
    aligned.weight = head.weight
    if head.bias is not None:
        aligned.bias = head.bias
    aligned.train(head.training)
    if hasattr(head, "_is_hf_initialized"):  # transformers' flag: its init skips a module that has it
        aligned._is_hf_initialized = head._is_hf_initialized
    model.lm_head = aligned
