"""GPT2MoEConfig and GPT2MoEForCausalLM: GPT-2 with selected MLP blocks replaced by ``MoEWrapper``.

Shapes (legend: docs/architecture.md): B rows, S positions, T = B * S tokens, E experts, K experts per
token, L MoE layers.

The model is a ``GPT2LMHeadModel`` whose blocks are ``GPT2MoEBlock`` and whose ``transformer.h[i].mlp``
is an ``MoEWrapper`` for every i in ``config.moe.layers``. Per-forward routing data travels as arguments
and return values: the forward derives the token mask from ``attention_mask`` and hands it, with a
``RouterRecord`` that each MoE block fills, down through GPT-2's blocks as keyword arguments. The output
is the usual causal-LM output plus ``router_outputs`` (``{block: RouterOutput}``) and, with
``output_router_logits`` (the config's default: true), the router terms of ``losses.moe_objective``:
``aux_loss`` (the load-balance loss, named as in HF's MoE models), ``z_loss``, ``entropy_loss`` (means
over MoE layers) and ``router_logits``; with ``labels`` also ``lm_loss`` and
``loss = lm_loss + lb_coef * aux_loss + z_coef * z_loss (+ entropy_coef * entropy_loss)``, the
coefficients being ``config.moe.loss_coefs()`` unless ``loss_coefs`` is passed.
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass

import torch
from huggingface_hub.dataclasses import strict
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions
from transformers.models.gpt2.modeling_gpt2 import GPT2Block
from transformers.utils.generic import can_return_tuple

from moe_emergence.config import BACKENDS, MoEConfig
from moe_emergence.layer import MoEWrapper
from moe_emergence.lm_head import align_lm_head
from moe_emergence.losses import LossCoefs, moe_objective
from moe_emergence.model_card import write_model_card
from moe_emergence.routing import RouterOutput
from moe_emergence.token_mask import as_token_mask

# transformers renamed within 5.x GPT-2's KV-cache argument (past_key_values -> cache) and gradient
# checkpointing (gradient_checkpointing_enable -> activation_checkpointing_enable, the old name deprecated)
_HAS_ACTIVATION_CHECKPOINTING = hasattr(GPT2LMHeadModel, "activation_checkpointing_enable")
_CACHE_ARG = (
    "cache" if "cache" in inspect.signature(GPT2LMHeadModel.forward).parameters else "past_key_values"
)


@strict
class GPT2MoEConfig(GPT2Config):
    """A ``GPT2Config`` plus ``moe`` (a ``MoEConfig``; a dict is accepted and converted, and saved
    ``config.json`` files hold it as a dict) and ``output_router_logits`` (default true: the forward
    computes the router losses and returns the router logits; false: LM loss only, as HF's MoE models)."""

    model_type = "gpt2_moe"

    moe: MoEConfig | dict | None = None
    output_router_logits: bool = True

    def __post_init__(self, **kwargs):
        if not isinstance(self.moe, MoEConfig):
            self.moe = MoEConfig.from_dict(self.moe or {})
        self.moe.resolve_layers(self.n_layer)
        super().__post_init__(**kwargs)

    @property
    def moe_layers(self) -> list[int]:
        """Block indices that are MoE layers, in block order."""
        return self.moe.resolve_layers(self.n_layer)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["moe"] = self.moe.to_dict()
        return out


class RouterRecord:
    """Collects each MoE block's ``RouterOutput`` during one model forward, ``{block: RouterOutput}``.

    A plain object (not a dict) on purpose: wrappers that copy containers among a module's arguments
    (FSDP2's input casting) pass it through unchanged. Gradient-checkpoint recomputation records a block
    again, with the same values (the RNG state is replayed)."""

    def __init__(self) -> None:
        self.outputs: dict[int, RouterOutput] = {}


class GPT2MoEBlock(GPT2Block):
    """``GPT2Block`` (same submodules and weights) whose MLP may be an ``MoEWrapper``: the forward takes
    the token mask and a ``RouterRecord`` as keyword arguments and passes them to the MoE layer.

    The computation is GPT-2's block written out (``ln_1 -> attn -> residual -> ln_2 -> mlp -> residual``)
    because ``GPT2Block`` calls its MLP with the hidden states only; a test checks it equals
    ``GPT2Block`` with a dense MLP. Cross-attention is not supported (``__init__`` refuses it)."""

    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        if config.add_cross_attention:
            raise ValueError("GPT2MoEForCausalLM: add_cross_attention=True is not supported")
        super().__init__(config, layer_idx=layer_idx)
        self.block_index = layer_idx

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache=None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = False,
        *,
        token_mask_T: torch.Tensor | None = None,
        router_record: RouterRecord | None = None,
        expert_masks: dict[int, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("GPT2MoEBlock: encoder_hidden_states (cross-attention) is not supported")
        # the cache positionally: transformers 5 renamed the keyword (past_key_values -> cache)
        attn_out, _ = self.attn(
            self.ln_1(hidden_states), cache, attention_mask=attention_mask, use_cache=use_cache, **kwargs
        )
        hidden_states = hidden_states + attn_out
        x = self.ln_2(hidden_states)
        if not isinstance(self.mlp, MoEWrapper):
            return hidden_states + self.mlp(x)
        expert_mask_E = None if expert_masks is None else expert_masks.get(self.block_index)
        y, routing = self.mlp(x, token_mask_T, expert_mask_E)
        if router_record is not None:
            router_record.outputs[self.block_index] = routing
        return hidden_states + y


class _KeepNothingCache(DynamicCache):
    """A KV cache that stays empty: ``update`` hands the new keys and values back without keeping them.

    Given to GPT-2 in a forward that builds no cache (training) and has neither an attention mask nor position
    ids: transformers (5.x, ``masking_utils._preprocess_mask_arguments``) otherwise searches GPT-2's own
    ``arange`` position ids for packed sequences whenever there is neither a mask nor a cache, with a
    data-dependent check on the device, i.e. a host sync in every forward (the host can no longer queue
    work ahead of the GPU). With this empty cache the causal mask is sized from it instead (no past: offset 0,
    length S), which is the mask that check finds for ``arange`` positions (never packed), and attention reads
    and keeps nothing but the current keys and values."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return key_states, value_states


@dataclass
class MoECausalLMOutput(CausalLMOutputWithCrossAttentions):
    """``CausalLMOutputWithCrossAttentions`` plus the MoE parts (module docstring); losses float32 scalars.

    lm_loss: next-token cross entropy (with ``labels``).
    aux_loss: load-balance loss, mean over MoE layers (``output_router_logits``).
    z_loss: router z-loss, mean over MoE layers (``output_router_logits``).
    entropy_loss: mean over MoE layers of the masked mean per-token entropy of the clean router
        probabilities (``output_router_logits``).
    router_logits: ``[T, E]`` float32 gate logits of each MoE layer, in block order (``output_router_logits``).
    router_outputs: ``{block: RouterOutput}`` of every MoE layer (always).
    """

    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    entropy_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    router_outputs: dict[int, RouterOutput] | None = None


class GPT2MoEForCausalLM(GPT2LMHeadModel):
    """GPT-2 LM whose selected MLP blocks are mixtures of experts (see module docstring)."""

    config_class = GPT2MoEConfig
    config: GPT2MoEConfig
    _no_split_modules = ["GPT2MoEBlock"]

    def __init__(self, config: GPT2MoEConfig) -> None:
        super().__init__(config)
        self.transformer.h = torch.nn.ModuleList(GPT2MoEBlock(config, i) for i in range(config.n_layer))
        moe = config.moe
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
        align_lm_head(self)  # GPT-2's odd vocabulary: aligned GEMMs for the head (lm_head.py)
        self.post_init()
        # post_init unions the children's lists (GPT2Model's names GPT2Block, which this model no longer has);
        # accelerate's FSDP wraps every class named here and refuses a name it cannot find
        self._no_split_modules = self.transformer._no_split_modules = {"GPT2MoEBlock"}

    def activation_checkpointing_enable(
        self,
        activation_checkpointing_kwargs: dict | None = None,
        every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """HF's activation (gradient) checkpointing, non-reentrant only; ``gradient_checkpointing_enable``
        (the older name) comes here too. ``every_n_layers`` and ``offload`` need a transformers release
        that has ``activation_checkpointing_enable`` (5.17 does not). Raises ``ValueError`` for
        ``use_reentrant=True``: the router losses reach the loss through the router outputs the
        checkpointed blocks return, and a reentrant checkpoint runs its first forward without autograd,
        which would cut them off silently."""
        kwargs = dict(activation_checkpointing_kwargs or {})
        if kwargs.get("use_reentrant", False):
            raise ValueError(
                "activation_checkpointing_enable: use_reentrant=True would drop the router losses' gradients "
                "(router outputs of a reentrant checkpoint carry no graph); use the default (non-reentrant)"
            )
        kwargs["use_reentrant"] = False
        if _HAS_ACTIVATION_CHECKPOINTING:
            super().activation_checkpointing_enable(kwargs, every_n_layers=every_n_layers, offload=offload)
        elif every_n_layers != 1 or offload:
            raise ValueError(
                "activation_checkpointing_enable: every_n_layers and offload need a transformers release with "
                "activation_checkpointing_enable (this one has only gradient_checkpointing_enable)"
            )
        else:
            super().gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    if not _HAS_ACTIVATION_CHECKPOINTING:  # older transformers 5.x: the old name is the real entry point

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
            self.activation_checkpointing_enable(gradient_checkpointing_kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """``PreTrainedModel.save_pretrained`` plus a ``README.md`` model card (``model_card``) saying that
        loading needs ``import moe_emergence`` (written on the main process; a README the user wrote or
        edited is kept, the package's own card follows the model saved last)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True) and os.path.isdir(save_directory):  # HF refuses a file path
            write_model_card(save_directory, self.config)

    def moe_layers(self) -> dict[int, MoEWrapper]:
        """``{block index: MoEWrapper}`` for every MoE block (``config.moe_layers``, in block order), read
        from the modules: called in ``forward``, it stays traceable by ``torch.compile``."""
        return {
            i: block.mlp for i, block in enumerate(self.transformer.h) if isinstance(block.mlp, MoEWrapper)
        }

    def set_experts_backend(self, backend: str) -> None:
        """Run every expert bank through ``backend`` (``MoEConfig.backend``'s names: ``"eager"`` is the
        reference, the others are tested against it); ``config.moe.backend`` follows, so a model upcycled
        from this config or saved from this model uses it too. Raises ``ValueError`` for an unknown name."""
        if backend not in BACKENDS:
            raise ValueError(f"set_experts_backend: backend {backend!r}; allowed: {', '.join(BACKENDS)}")
        self.config.moe.backend = backend
        for layer in self.moe_layers().values():
            layer.experts.backend = backend

    def set_router_step(self, step: int) -> None:
        """Set the optimizer step of every router (drives noise annealing)."""
        for layer in self.moe_layers().values():
            layer.router.set_step(step)

    def update_selection_bias(self, tokens_per_expert_by_layer: dict[int, torch.Tensor]) -> None:
        """Aux-loss-free balancing: ``Router.update_selection_bias`` for each MoE block, with that block's
        ``[E]`` load of the optimizer step (``losses.routed_tokens_per_expert`` summed over its
        micro-batches). Raises ``ValueError`` without a selection bias or for the wrong blocks."""
        if self.config.moe.bias_update_rate == 0:
            raise ValueError("update_selection_bias: MoEConfig.bias_update_rate is 0 (no selection bias)")
        layers = self.moe_layers()
        if sorted(tokens_per_expert_by_layer) != sorted(layers):
            raise ValueError(
                f"update_selection_bias: got loads for blocks {sorted(tokens_per_expert_by_layer)}, "
                f"expected exactly the MoE blocks {sorted(layers)}"
            )
        for i, tokens_per_expert_E in tokens_per_expert_by_layer.items():
            layers[i].router.update_selection_bias(tokens_per_expert_E)

    def check_can_generate(self) -> None:
        """Raises ``ValueError`` when the routing is not causal (``routing='expert_choice'``)."""
        if self.config.moe.routing == "expert_choice":
            raise ValueError(
                "generate: routing='expert_choice' is not causal (each expert ranks all tokens of the "
                "forward, future ones included), so it cannot generate; use it for analysis only"
            )

    def generate(self, *args, **kwargs):
        self.check_can_generate()
        return super().generate(*args, **kwargs)

    def _router_terms(self, out, routers: dict[int, RouterOutput], mask_T, labels, loss_coefs) -> dict:
        """The output fields of ``output_router_logits``: the router losses of ``losses.moe_objective``, the
        router logits and, with labels, the objective as ``loss``."""
        coefs = self.config.moe.loss_coefs() if loss_coefs is None else loss_coefs
        lm = out.loss if labels is not None else torch.zeros((), device=out.logits.device)
        objective = moe_objective(lm, list(routers.values()), mask_T, self.config.moe.num_experts, coefs)
        terms = dict(
            aux_loss=objective.lb_loss,
            z_loss=objective.z_loss,
            entropy_loss=objective.entropy_loss,
            router_logits=tuple(r.router_logits for r in routers.values()),
        )
        return terms | ({"loss": objective.loss} if labels is not None else {})

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache=None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_router_logits: bool | None = None,
        loss_coefs: LossCoefs | None = None,
        expert_masks: dict[int, torch.Tensor] | None = None,
        **kwargs,
    ) -> MoECausalLMOutput:
        """``GPT2LMHeadModel.forward`` (same arguments, in the same order, and ``return_dict``) plus the
        MoE outputs (module docstring).

        cache: the KV cache (transformers' ``Cache``; older 5.x releases call it ``past_key_values``,
            which is accepted through ``kwargs``).
        use_cache: default ``config.use_cache``, except that a forward in training mode or with
            ``labels`` builds no KV cache unless ``use_cache=True`` is passed.
        loss_coefs: overrides ``config.moe.loss_coefs()`` for this forward (e.g. a schedule's value).
        expert_masks: ``{block: bool [E]}`` removes experts (False) from those MoE blocks' routing
            (``Router``; ablations).
        The token mask of the router and the losses is ``attention_mask`` (its last S columns with a
        cache). Raises ``ValueError`` for a mask of a block that is not an MoE layer."""
        if expert_masks is not None and not set(expert_masks) <= set(self.config.moe_layers):
            raise ValueError(
                f"expert_masks: blocks {sorted(set(expert_masks) - set(self.config.moe_layers))} are not "
                f"MoE layers (those are {self.config.moe_layers})"
            )
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        if use_cache is None:
            use_cache = False if self.training or labels is not None else self.config.use_cache
        # "past_key_values": the cache's name in older 5.x releases, passed through kwargs
        no_cache_mask_or_positions = (
            cache is None
            and "past_key_values" not in kwargs
            and attention_mask is None
            and position_ids is None
        )
        if not use_cache and no_cache_mask_or_positions:
            cache = _KeepNothingCache()  # no host sync: see _KeepNothingCache
        if cache is not None:
            kwargs[_CACHE_ARG] = cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You have to specify exactly one of input_ids or inputs_embeds")
        B, S = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        mask_T = as_token_mask(attention_mask, B * S, rows=B)
        record = RouterRecord()
        out = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            return_dict=True,
            token_mask_T=mask_T,
            router_record=record,
            expert_masks=expert_masks,
            **kwargs,
        )
        routers = {i: record.outputs[i] for i in sorted(record.outputs)}
        moe = self._router_terms(out, routers, mask_T, labels, loss_coefs) if output_router_logits else {}
        # built once, so return_dict=False's tuple follows the fields' order (GPT-2's, then the MoE ones)
        fields = {**dict(out.items()), "lm_loss": out.loss, **moe, "router_outputs": routers}
        return MoECausalLMOutput(**fields)
