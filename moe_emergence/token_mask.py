"""The token mask: which of a forward's T tokens are real (1) and which are padding (0).

Shapes (legend: docs/architecture.md): B rows, S positions of this forward, H cached positions before
them, T = B * S tokens.

Every function of the package that takes a token mask (router, losses, telemetry) reads it through
``as_token_mask``, so each accepts the masks users pass to the model: the flat ``[T]`` mask, the
model's ``attention_mask`` ``[B, S]``, and with a KV cache its ``[B, H + S]`` form (the last S columns
are this forward's tokens).
"""

from __future__ import annotations

import torch


def as_token_mask(mask: torch.Tensor | None, num_tokens: int, rows: int | None = None) -> torch.Tensor | None:
    """The ``[T]`` bool token mask (True = real: any non-zero entry) of a forward of ``num_tokens`` = T tokens, or None for None.

    ``mask``: ``[T]``; ``[B, S]`` with B * S = T; or ``[B, H + S]`` (an attention mask covering cached
    positions: its last S = T / B columns are taken). ``rows`` (B) disambiguates the cached form when
    the caller knows it; otherwise B is the mask's first dimension. Raises ``ValueError`` naming the
    accepted shapes for anything else.
    """
    if mask is None:
        return None
    if mask.dim() == 1 and mask.shape[0] == num_tokens:
        return mask != 0
    if mask.dim() == 2:
        B = mask.shape[0] if rows is None else rows
        if mask.shape[0] == B and B > 0 and num_tokens % B == 0 and num_tokens // B <= mask.shape[1]:
            return mask[:, mask.shape[1] - num_tokens // B :].reshape(-1) != 0
    raise ValueError(
        f"token mask has shape {tuple(mask.shape)}; for {num_tokens} tokens expected ({num_tokens},), "
        f"(B, S) with B * S = {num_tokens}, or an attention mask (B, H + S) whose last S columns are "
        f"this forward's tokens"
    )
