"""MoEConfig: every routing and expert option of an upcycled MoE layer, validated on construction.

The config is a plain dataclass so it can live inside YAML run configs and inside
``GPT2MoEConfig`` (as a dict) alike. Validation never clamps: a bad value raises ``ValueError``
naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from moe_emergence.config_loader import build
from moe_emergence.losses import LossCoefs
from moe_emergence.schedules import coef_at, validate_schedule

INIT_METHODS = ("copy", "noise", "drop")
BACKENDS = ("auto", "eager", "grouped_mm", "triton")
ROUTING_MODES = ("token_choice", "expert_choice")
OVERFLOW_MODES = ("drop", "next_best")
SHARED_GATES = ("fixed", "learned")


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"MoEConfig.{name}={value!r} is invalid: {allowed}")


@dataclass
class MoEConfig:
    """Options of the MoE layers that replace GPT-2 MLP blocks.

    Routing (see ``routing.Router``):
        num_experts: E, experts per MoE layer (>= 1).
        top_k: k, experts per token (1 <= k <= E).
        layers: block indices to convert, or ``"all"``. Checked against the model by
            ``resolve_layers(n_layer)``.
        noise_std: std of Gaussian noise added to router logits in training (>= 0).
        noise_anneal_steps: optimizer steps over which the noise std goes linearly to 0
            (0 = constant noise).
        straight_through: k=1 only: forward weight exactly 1.0, gradient through the selected
            probability.
        normalize_topk: renormalise the k selected probabilities to sum to 1.
        router_init_std: std of the normal init of the router's gate (>= 0; 0 = zeros, uniform routing).

    Expert init (see ``upcycle``):
        init: ``"copy"`` (exact copies of the dense MLP), ``"noise"`` (copy plus
            N(0, init_noise_std * std(param)) per expert), ``"drop"`` (Drop-Upcycling: re-initialise
            ``drop_ratio`` of each expert's intermediate neurons).
        init_noise_std: relative noise std for ``init="noise"`` (>= 0).
        drop_ratio: fraction of intermediate neurons re-initialised per expert for ``"drop"``, in [0, 1].
        seed: seed of the router init and the expert perturbations.

    Losses (see ``losses``):
        lb_coef: weight of the Switch load-balance loss (>= 0).
        z_coef: weight of the router z-loss (>= 0).

    Dispatch:
        backend: expert computation by name (see ``experts.get_backend``); ``"eager"`` is the
            reference every other backend is tested against, ``"auto"`` picks the fastest that runs.

    Routing variants for ablations (all off by default; off = bit-identical to plain top-k; formulas in
    ``docs/architecture.md`` and the docstrings of ``routing``, ``capacity`` and ``selection``):
        routing: ``"token_choice"`` (each token picks k experts) or ``"expert_choice"`` (Zhou et al.
            2022: each expert picks its top-C tokens; NOT causal, for analysis; ``generate`` refuses it).
        capacity_factor: None = dropless; else >= 1.0 and each expert takes at most
            ``C = min(T, ceil(T * k / E * capacity_factor))`` assignments per forward (T real tokens in
            the forward: padding never counts). For expert choice it sets C (None counts as 1.0).
        overflow: what happens to an assignment past capacity: ``"drop"`` (weight 0) or ``"next_best"``
            (the token's next-ranked expert with room).
        shared_expert: add one always-on dense expert (the upcycled dense MLP):
            ``y = (1 - g) * routed + g * shared``.
        shared_expert_gate: ``"fixed"`` (g = shared_expert_weight) or ``"learned"`` (per-token
            ``g = sigmoid(x . w_g + b_g)``, w_g = 0 and b_g = logit(shared_expert_weight) at init).
        shared_expert_weight: g in [0, 1] (in (0, 1) for the learned gate).
        bias_update_rate: aux-loss-free balancing (DeepSeek-V3) when > 0: a per-expert selection bias,
            ``b_e += rate * sign(mean_load - load_e)`` once per optimizer step (``update_selection_bias``).
        entropy_coef: ``loss += entropy_coef * entropy_loss`` (mean per-token router entropy); positive
            sharpens, negative spreads; any finite number.
        random_routing_prob: training only; with this probability a token's top-1 expert is replaced
            by a uniformly random one; in [0, 1].
        expert_dropout: training only; each expert is dropped from selection for the forward with this
            probability (the k with the highest draws always survive); in [0, 1).
        lb_schedule, z_schedule: None (constant) or a schedule dict for lb_coef / z_coef over
            optimizer steps (``schedules`` module); ``loss_coefs(step)`` gives the coefficients in force.
    """

    num_experts: int = 8
    top_k: int = 1
    layers: list[int] | Literal["all"] = "all"
    noise_std: float = 0.1
    noise_anneal_steps: int = 1000
    straight_through: bool = True
    normalize_topk: bool = True
    router_init_std: float = 0.02
    init: str = "copy"
    init_noise_std: float = 0.01
    drop_ratio: float = 0.5
    seed: int = 0
    lb_coef: float = 0.01
    z_coef: float = 0.001
    backend: str = "eager"
    routing: str = "token_choice"
    capacity_factor: float | None = None
    overflow: str = "drop"
    shared_expert: bool = False
    shared_expert_gate: str = "fixed"
    shared_expert_weight: float = 0.5
    bias_update_rate: float = 0.0
    entropy_coef: float = 0.0
    random_routing_prob: float = 0.0
    expert_dropout: float = 0.0
    lb_schedule: dict[str, Any] | None = None
    z_schedule: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        if not is_int(self.num_experts) or self.num_experts < 1:
            _fail("num_experts", self.num_experts, "an integer >= 1")
        if not is_int(self.top_k) or not 1 <= self.top_k <= self.num_experts:
            _fail("top_k", self.top_k, f"an integer in [1, num_experts={self.num_experts}]")
        if self.layers != "all":
            if not isinstance(self.layers, (list, tuple)) or not self.layers:
                _fail("layers", self.layers, '"all" or a non-empty list of block indices')
            if not all(is_int(i) and i >= 0 for i in self.layers):
                _fail("layers", self.layers, "block indices must be integers >= 0")
            if len(set(self.layers)) != len(self.layers):
                _fail("layers", self.layers, "block indices must be unique")
            self.layers = sorted(self.layers)
        for name in ("noise_std", "init_noise_std", "router_init_std", "lb_coef", "z_coef"):
            value = getattr(self, name)
            if not is_num(value) or value < 0 or value != value or value == float("inf"):
                _fail(name, value, "a finite number >= 0")
        if not is_int(self.noise_anneal_steps) or self.noise_anneal_steps < 0:
            _fail("noise_anneal_steps", self.noise_anneal_steps, "an integer >= 0 (0 = no annealing)")
        for name in ("straight_through", "normalize_topk"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "true or false")
        if self.init not in INIT_METHODS:
            _fail("init", self.init, f"one of {INIT_METHODS}")
        if not is_num(self.drop_ratio) or not 0.0 <= self.drop_ratio <= 1.0:
            _fail("drop_ratio", self.drop_ratio, "a number in [0, 1]")
        if not is_int(self.seed):
            _fail("seed", self.seed, "an integer")
        if self.backend not in BACKENDS:
            _fail("backend", self.backend, f"one of {BACKENDS}")
        self._validate_variants(is_num)

    def _validate_variants(self, is_num) -> None:
        def finite(v: Any) -> bool:
            return is_num(v) and v == v and abs(v) != float("inf")

        if self.routing not in ROUTING_MODES:
            _fail("routing", self.routing, f"one of {ROUTING_MODES}")
        if self.capacity_factor is not None and (
            not finite(self.capacity_factor) or self.capacity_factor < 1.0
        ):
            _fail("capacity_factor", self.capacity_factor, "None (dropless) or a finite number >= 1.0")
        if self.overflow not in OVERFLOW_MODES:
            _fail("overflow", self.overflow, f"one of {OVERFLOW_MODES}")
        if not isinstance(self.shared_expert, bool):
            _fail("shared_expert", self.shared_expert, "true or false")
        if self.shared_expert_gate not in SHARED_GATES:
            _fail("shared_expert_gate", self.shared_expert_gate, f"one of {SHARED_GATES}")
        w = self.shared_expert_weight
        if self.shared_expert_gate == "learned":
            if not finite(w) or not 0.0 < w < 1.0:
                _fail(
                    "shared_expert_weight", w, "a number in (0, 1) for the learned gate (its initial value)"
                )
        elif not finite(w) or not 0.0 <= w <= 1.0:
            _fail("shared_expert_weight", w, "a number in [0, 1]")
        if not finite(self.bias_update_rate) or self.bias_update_rate < 0:
            _fail("bias_update_rate", self.bias_update_rate, "a finite number >= 0 (0 = off)")
        if not finite(self.entropy_coef):
            _fail("entropy_coef", self.entropy_coef, "a finite number (negative spreads, positive sharpens)")
        if not finite(self.random_routing_prob) or not 0.0 <= self.random_routing_prob <= 1.0:
            _fail("random_routing_prob", self.random_routing_prob, "a number in [0, 1]")
        if not finite(self.expert_dropout) or not 0.0 <= self.expert_dropout < 1.0:
            _fail("expert_dropout", self.expert_dropout, "a number in [0, 1)")
        validate_schedule("lb_schedule", self.lb_schedule)
        validate_schedule("z_schedule", self.z_schedule)
        if self.routing == "expert_choice":
            for name in ("bias_update_rate", "random_routing_prob", "expert_dropout"):
                if getattr(self, name) != 0:
                    _fail(name, getattr(self, name), "0 with routing='expert_choice' (token-choice only)")

    def resolve_layers(self, n_layer: int) -> list[int]:
        """Block indices to convert in a model of ``n_layer`` blocks; raises if one is outside it."""
        if self.layers == "all":
            return list(range(n_layer))
        bad = [i for i in self.layers if i >= n_layer]
        if bad:
            _fail("layers", self.layers, f"indices {bad} are outside the model's blocks 0..{n_layer - 1}")
        return list(self.layers)

    def loss_coefs(self, step: int | None = None) -> LossCoefs:
        """The objective's coefficients at optimizer step ``step`` (since the upcycle): ``lb_coef`` and
        ``z_coef`` through ``lb_schedule`` / ``z_schedule`` (``schedules.coef_at``), and ``entropy_coef``;
        ``step=None`` gives the base values, no schedule applied. Raises ``ValueError`` for a step < 0."""
        if step is None:
            return LossCoefs(float(self.lb_coef), float(self.z_coef), float(self.entropy_coef))
        return LossCoefs(
            lb_coef=coef_at(self.lb_coef, self.lb_schedule, step),
            z_coef=coef_at(self.z_coef, self.z_schedule, step),
            entropy_coef=float(self.entropy_coef),
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = self.layers if self.layers == "all" else list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MoEConfig:
        """Build from a plain mapping through the package's config loader; raises ``ConfigError`` (a
        ``ValueError``) for an unknown key (with the closest valid one), a wrong type or an invalid value."""
        return build(cls, d)
