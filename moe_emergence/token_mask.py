"""The token mask: which of a forward's T tokens are real (1) and which are padding (0).

Shapes (legend: docs/architecture.md): B rows, S positions of this forward, H cached positions before
them, T = B * S tokens.

Every function of the package that takes a token mask (router, losses, telemetry) reads it through
``as_token_mask``, so each accepts the masks users pass to the model: the flat ``[T]`` mask and the
model's ``attention_mask`` ``[B, S]``; the model's forward and the router (which know B) also take the
``[B, H + S]`` form of a KV-cached forward (the last S columns are this forward's tokens).
"""

from __future__ import annotations

import torch


def as_token_mask(mask: torch.Tensor | None, num_tokens: int, rows: int | None = None) -> torch.Tensor | None:
    """The ``[T]`` bool token mask (True = real: any non-zero entry) of a forward of ``num_tokens`` = T
    tokens, or None for None.

    ``mask``: ``[T]``; ``[B, S]`` with B * S = T; or, when the caller passes ``rows`` = B (the model's
    forward, the router on ``[B, S, D]`` input), an attention mask ``[B, H + S]`` covering cached positions,
    whose last S = T / B columns are taken. Without ``rows`` a 2-d mask must be exactly ``[B, S]`` (a wider
    one is ambiguous). Raises ``ValueError`` naming the accepted shapes for anything else.
    """
    if mask is None:
        return None
    if mask.dim() == 1 and mask.shape[0] == num_tokens:
        return mask if mask.dtype == torch.bool else mask != 0  # the model's own mask: no new tensor
    if mask.dim() == 2:
        if rows is None and mask.numel() == num_tokens:
            return mask.reshape(-1) != 0
        if (
            rows == mask.shape[0]
            and rows > 0
            and num_tokens % rows == 0
            and num_tokens // rows <= mask.shape[1]
        ):
            return mask[:, mask.shape[1] - num_tokens // rows :].reshape(-1) != 0
    cached = (
        ""
        if rows is None
        else f", or an attention mask ({rows}, H + S) whose last S columns are this forward's"
    )
    raise ValueError(
        f"token mask has shape {tuple(mask.shape)}; for {num_tokens} tokens expected ({num_tokens},) or "
        f"(B, S) with B * S = {num_tokens}{cached}"
    )
