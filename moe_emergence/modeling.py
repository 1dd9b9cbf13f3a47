"""GPT2MoEConfig and GPT2MoEForCausalLM: GPT-2 with selected MLP blocks replaced by ``MoEWrapper``.

Shapes: B batch, L sequence length, T = B * L tokens, E experts, K experts per token.

The model is a ``GPT2LMHeadModel`` whose ``transformer.h[i].mlp`` is an ``MoEWrapper`` for every i in
``config.moe["layers"]``. Its forward returns the usual causal-LM output plus ``lm_loss``,
``aux_loss`` (Switch load balance, mean over MoE layers), ``z_loss`` and ``entropy_loss`` (means over
MoE layers); with ``labels``, ``loss = lm_loss + lb_coef * aux_loss + z_coef * z_loss`` (plus
``entropy_coef * entropy_loss`` when ``entropy_coef != 0``). ``lb_coef`` / ``z_coef`` are the config's
values until the trainer sets others (``set_loss_coefs`` / ``schedule_loss_coefs``).
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
from moe_emergence.losses import aux_losses_per_layer, expert_counts, masked_mean
from moe_emergence.routing import RouterOutput
from moe_emergence.schedules import coef_at


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
    entropy_loss: mean over MoE layers of the (padding-masked) mean per-token entropy of the clean
        router probabilities.
    """

    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    entropy_loss: torch.Tensor | None = None


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
            if moe.shared_expert:
                with torch.no_grad():
                    layer.shared_expert.c_fc.weight.normal_(std=std)
                    layer.shared_expert.c_proj.weight.normal_(std=std / math.sqrt(2 * config.n_layer))
                    layer.shared_expert.c_fc.bias.zero_()
                    layer.shared_expert.c_proj.bias.zero_()
                if moe.shared_expert_gate == "learned":
                    layer.reset_shared_gate()
            self.transformer.h[i].mlp = layer
        self.loss_coefs = {"lb": float(moe.lb_coef), "z": float(moe.z_coef)}
        self.post_init()

    def moe_layers(self) -> dict[int, MoEWrapper]:
        """``{block index: MoEWrapper}`` for every MoE block (``config.moe_layers``, in block order), read
        from the modules: called in ``forward``, it stays traceable by ``torch.compile``."""
        return {
            i: block.mlp for i, block in enumerate(self.transformer.h) if isinstance(block.mlp, MoEWrapper)
        }

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

    def set_loss_coefs(self, lb: float | None = None, z: float | None = None) -> None:
        """Set the load-balance / z-loss coefficients used by ``forward`` (plain floats; None keeps one)."""
        for name, value in (("lb", lb), ("z", z)):
            if value is None:
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"set_loss_coefs: {name}={value!r} is invalid: a finite number >= 0")
            self.loss_coefs[name] = float(value)

    def schedule_loss_coefs(self, step: int) -> dict[str, float]:
        """Set the coefficients from ``lb_schedule`` / ``z_schedule`` at optimizer step ``step``
        (``schedules`` module) and return them (``{"lb_coef": ..., "z_coef": ...}``, for logging)."""
        moe = self.config.moe_config
        lb = coef_at(moe.lb_coef, moe.lb_schedule, step)
        z = coef_at(moe.z_coef, moe.z_schedule, step)
        self.set_loss_coefs(lb=lb, z=z)
        return {"lb_coef": lb, "z_coef": z}

    def expert_load(self, token_mask_T: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """Assignments each expert computed in the last forward, ``{block: float32 [E]}``: padding and
        capacity-dropped assignments excluded; with expert choice, the real tokens each expert took.
        Sum it over a step's micro-batches for ``update_selection_bias``."""
        E = self.config.moe["num_experts"]
        out = {}
        for i, r in self.router_outputs().items():
            if r.ec_tokens is not None:
                real_T = torch.ones(r.router_probs.shape[0], device=r.ec_tokens.device)
                if token_mask_T is not None:
                    real_T = token_mask_T.to(real_T)
                out[i] = real_T[r.ec_tokens].sum(1)
                continue
            kept_TK = None if r.dropped is None else ~r.dropped
            out[i] = expert_counts(r.topk_indices, E, token_mask_T, assignment_mask_TK=kept_TK)
        return out

    def variant_stats(self, token_mask_T: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Telemetry of the routing variants for the last forward, on-device float32 scalars (no sync):
        ``router/layer{L}/dropped_frac`` (capacity: fraction of real assignments dropped),
        ``router/layer{L}/unrouted_frac`` (expert choice: fraction of real tokens no expert took),
        ``router/layer{L}/selection_bias_e{i}`` (aux-loss-free balancing). Empty with every variant off."""
        out = {}
        for i, r in self.router_outputs().items():
            if r.dropped is not None:
                out[f"router/layer{i}/dropped_frac"] = masked_mean(r.dropped.float().mean(-1), token_mask_T)
            if r.unrouted is not None:
                out[f"router/layer{i}/unrouted_frac"] = masked_mean(r.unrouted.float(), token_mask_T)
            router = self.transformer.h[i].mlp.router
            if router.bias_update_rate > 0:
                for e, b in enumerate(router.selection_bias.detach().unbind()):
                    out[f"router/layer{i}/selection_bias_e{e}"] = b
        return out

    def update_selection_bias(self, counts_by_layer: dict[int, torch.Tensor]) -> None:
        """Aux-loss-free balancing: ``Router.update_selection_bias`` for each MoE block, with that block's
        per-expert load of the optimizer step (e.g. summed ``expert_load`` of its micro-batches)."""
        if self.config.moe["bias_update_rate"] == 0:
            raise ValueError("update_selection_bias: MoEConfig.bias_update_rate is 0 (no selection bias)")
        layers = self.moe_layers()
        if sorted(counts_by_layer) != sorted(layers):
            raise ValueError(
                f"update_selection_bias: got loads for blocks {sorted(counts_by_layer)}, "
                f"expected exactly the MoE blocks {sorted(layers)}"
            )
        for i, load_E in counts_by_layer.items():
            layers[i].router.update_selection_bias(load_E)

    def generate(self, *args, **kwargs):
        if self.config.moe["routing"] == "expert_choice":
            raise ValueError(
                "generate: routing='expert_choice' is not causal (each expert ranks all tokens of the "
                "forward, future ones included), so it cannot generate; use it for analysis only"
            )
        return super().generate(*args, **kwargs)

    def entropy_loss(self, token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over MoE layers of the masked mean per-token entropy of the clean router probabilities."""
        return torch.stack(
            [masked_mean(r.entropy, token_mask_T) for r in self.router_outputs().values()]
        ).mean()

    def aux_losses(self, token_mask_T: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(load-balance loss, z-loss) of the last forward, each the mean over MoE layers."""
        lb_L, z_L = aux_losses_per_layer(self.router_outputs(), token_mask_T, self.config.moe["num_experts"])
        return lb_L.mean(), z_L.mean()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> MoECausalLMOutput:
        token_mask_T = None
        if attention_mask is not None:
            L = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[1]
            token_mask_T = attention_mask[:, -L:].reshape(-1)  # with a KV cache the mask covers the past too
        for layer in self.moe_layers().values():
            layer.token_mask_T = token_mask_T
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        aux, z = self.aux_losses(token_mask_T)
        entropy = self.entropy_loss(token_mask_T)
        loss = None
        if labels is not None:
            loss = out.loss + self.loss_coefs["lb"] * aux + self.loss_coefs["z"] * z
            if self.config.moe["entropy_coef"] != 0:
                loss = loss + self.config.moe["entropy_coef"] * entropy
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
            entropy_loss=entropy,
        )
