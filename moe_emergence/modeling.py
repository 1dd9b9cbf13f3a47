"""GPT2MoEConfig and GPT2MoEForCausalLM: GPT-2 with selected MLP blocks replaced by ``MoEWrapper``.

Shapes: B batch, L sequence length, T = B * L tokens, E experts, K experts per token.

The model is a ``GPT2LMHeadModel`` whose ``transformer.h[i].mlp`` is an ``MoEWrapper`` for every i in
``config.moe["layers"]``. Its forward returns the usual causal-LM output plus ``lm_loss``,
``aux_loss`` (Switch load balance, mean over MoE layers) and ``z_loss`` (mean over MoE layers); with
``labels``, ``loss = lm_loss + lb_coef * aux_loss + z_coef * z_loss``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from huggingface_hub.dataclasses import strict
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

from moe_emergence.config import MoEConfig
from moe_emergence.layer import MoEWrapper
from moe_emergence.losses import load_balance_loss, z_loss
from moe_emergence.routing import RouterOutput


@strict
class GPT2MoEConfig(GPT2Config):
    """A ``GPT2Config`` plus ``moe``: the ``MoEConfig`` fields as a dict (``moe_config`` gives the dataclass)."""

    model_type = "gpt2_moe"

    moe: dict | None = None

    def __post_init__(self, **kwargs):
        if isinstance(self.moe, MoEConfig):
            self.moe = self.moe.to_dict()
        moe = MoEConfig.from_dict(self.moe or {})
        self.moe = moe.to_dict()
        moe.resolve_layers(self.n_layer)
        super().__post_init__(**kwargs)

    @property
    def moe_config(self) -> MoEConfig:
        return MoEConfig.from_dict(self.moe)

    @property
    def moe_layers(self) -> list[int]:
        return self.moe_config.resolve_layers(self.n_layer)


@dataclass
class MoECausalLMOutput(CausalLMOutputWithCrossAttentions):
    """``CausalLMOutputWithCrossAttentions`` plus the three loss terms, each a float32 scalar.

    lm_loss: next-token cross entropy (only with ``labels``).
    aux_loss: load-balance loss, mean over MoE layers.
    z_loss: router z-loss, mean over MoE layers.
    """

    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None


class GPT2MoEForCausalLM(GPT2LMHeadModel):
    """GPT-2 LM whose selected MLP blocks are mixtures of experts (see module docstring)."""

    config_class = GPT2MoEConfig
    config: GPT2MoEConfig

    def __init__(self, config: GPT2MoEConfig) -> None:
        super().__init__(config)
        moe = config.moe_config
        d_ff = config.n_inner if config.n_inner is not None else 4 * config.n_embd
        for i in config.moe_layers:
            layer = MoEWrapper(moe, config.n_embd, d_ff, config.activation_function, config.resid_pdrop)
            # GPT-2's init: N(0, initializer_range), output projection scaled by 1/sqrt(2 * n_layer).
            # Done here, not in `_init_weights`: transformers dispatches the init of everything under
            # `self.transformer` to GPT2Model's own `_init_weights`, which does not know these modules.
            std = config.initializer_range
            layer.experts.reset_parameters(std, std / math.sqrt(2 * config.n_layer))
            layer.router.reset_parameters(moe.router_init_std)
            self.transformer.h[i].mlp = layer
        self.post_init()

    def moe_layers(self) -> dict[int, MoEWrapper]:
        """``{block index: MoEWrapper}`` for every MoE block."""
        return {i: self.transformer.h[i].mlp for i in self.config.moe_layers}

    def router_outputs(self) -> dict[int, RouterOutput]:
        """Router outputs of the last forward, ``{block index: RouterOutput}`` (for losses and telemetry)."""
        out = {}
        for i, layer in self.moe_layers().items():
            if layer.last_router_output is None:
                raise RuntimeError(f"MoE block {i} has no router output yet: run a forward first")
            out[i] = layer.last_router_output
        return out

    def set_router_step(self, step: int) -> None:
        """Set the optimizer step of every router (drives noise annealing)."""
        for layer in self.moe_layers().values():
            layer.router.set_step(step)

    def aux_losses(self, token_mask_T: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(load-balance loss, z-loss) of the last forward, each the mean over MoE layers."""
        E = self.config.moe["num_experts"]
        lb, z = [], []
        for r in self.router_outputs().values():
            lb.append(load_balance_loss(r.router_probs, r.topk_indices, E, token_mask_T))
            z.append(z_loss(r.router_logits, token_mask_T))
        return torch.stack(lb).mean(), torch.stack(z).mean()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> MoECausalLMOutput:
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        token_mask_T = None
        if attention_mask is not None:
            L = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[1]
            token_mask_T = attention_mask[:, -L:].reshape(-1)  # with a KV cache the mask covers the past too
        aux, z = self.aux_losses(token_mask_T)
        loss = None
        if labels is not None:
            moe = self.config.moe
            loss = out.loss + moe["lb_coef"] * aux + moe["z_coef"] * z
        return MoECausalLMOutput(
            loss=loss,
            logits=out.logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            cross_attentions=out.cross_attentions,
            lm_loss=out.loss,
            aux_loss=aux,
            z_loss=z,
        )
