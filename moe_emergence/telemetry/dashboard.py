"""The shipped wandb dashboard: which panels, over which logged keys. Plain data; no wandb import here.

``dashboard_sections(logged)`` turns the keys that runs logged (their ``metrics.jsonl``) into sections of
panels. Every key is built by ``names``; a panel keeps only keys that were logged, and a panel left with
none is dropped, so the dashboard never points at a key the trainer did not write (a dense run gets the
loss and training sections only; the capacity, expert-choice and aux-loss-free panels appear only for
runs that log those statistics). Evaluations appear per split (``val/``, ``eval/``: ``names.split_prefixes``),
each where it was logged. The heatmaps (``<split>_router/layer<i>/domain_expert``) are wandb images, never in
``metrics.jsonl``: they are shown for every layer that has that split's routing statistics, which the trainer
logs in the same call as the heatmap (``Trainer.run_eval``).

``workspace(...)`` turns the sections into a ``wandb_workspaces`` saved view; that package is imported
there, only when a dashboard is built (``scripts/wandb_dashboard.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from moe_emergence.telemetry import names as keys

SHARE = (0.0, 1.0)  # y range of shares and NMI


@dataclass(frozen=True)
class Panel:
    """One chart: ``line`` (a line per key and run), ``stacked`` (stacked areas of one run's keys, e.g. the
    expert shares of a layer, which sum to 1) or ``media`` (the wandb images logged under ``keys``)."""

    title: str
    keys: tuple[str, ...]
    kind: Literal["line", "stacked", "media"] = "line"
    y_range: tuple[float | None, float | None] = (None, None)


@dataclass(frozen=True)
class Section:
    name: str
    panels: tuple[Panel, ...]
    is_open: bool = True
    columns: int = 3


@dataclass(frozen=True)
class _Logged:
    """What the runs logged, taken apart by ``names``."""

    logged: frozenset[str]
    train: dict[int, set[str]] = field(default_factory=dict)  # layer -> per-layer names
    evals: dict[str, dict[int, set[str]]] = field(default_factory=dict)  # eval routing prefix -> the same
    domains: tuple[str, ...] = ()

    @classmethod
    def of(cls, logged: Iterable[str]) -> _Logged:
        all_keys = frozenset(logged)
        prefixes = [p for p, _ in keys.SPLIT_PREFIXES.values()]
        domains = sorted({d for k in all_keys for p in prefixes if (d := keys.parse_domain_loss(k, p))})
        return cls(
            all_keys,
            keys.logged_layers(all_keys, keys.ROUTER),
            {r: keys.logged_layers(all_keys, r) for _, r in keys.SPLIT_PREFIXES.values()},
            tuple(domains),
        )

    def per_layer(self, prefix: str, name: str) -> list[str]:
        """``<prefix>/layer<i>/<name>`` for every layer that logged it."""
        layers = self.train if prefix == keys.ROUTER else self.evals[prefix]
        return [keys.layer_key(prefix, i, name) for i in sorted(layers) if name in layers[i]]

    def experts(self, layer: int, name=keys.expert_frac) -> list[str]:
        """``router/layer<i>/<name(e)>`` for every expert e of the layer (known by its logged share),
        e.g. the layer's expert shares (``expert_frac``) or selection biases (``selection_bias``)."""
        logged = self.train[layer]
        experts = sorted(e for n in logged if (e := keys.parse_expert_frac(n)) is not None)
        return [keys.layer_key(keys.ROUTER, layer, name(e)) for e in experts if name(e) in logged]


def _panel(title: str, wanted: Iterable[str], lg: _Logged, **kw: Any) -> Panel | None:
    present = tuple(k for k in wanted if k in lg.logged)
    return Panel(title, present, **kw) if present else None


def _section(name: str, panels: Iterable[Panel | None], **kw: Any) -> Section | None:
    kept = tuple(p for p in panels if p is not None)
    return Section(name, kept, **kw) if kept else None


def _losses(lg: _Logged) -> Section | None:
    return _section(
        "Loss",
        [
            _panel(
                "LM loss: train, val and eval (nats/token)",
                [keys.TRAIN_LM_LOSS, keys.VAL_LM_LOSS, keys.EVAL_LM_LOSS],
                lg,
            ),
            *[
                _panel(f"{p} LM loss by domain", [keys.domain_loss(d, p) for d in lg.domains], lg)
                for p, _ in keys.SPLIT_PREFIXES.values()
            ],
            _panel("objective (LM + weighted router losses)", [keys.TRAIN_LOSS], lg),
            _panel("load-balance loss (1 = balanced)", [keys.TRAIN_LB_LOSS], lg),
            _panel("router z-loss", [keys.TRAIN_Z_LOSS], lg),
            _panel("router entropy loss", [keys.TRAIN_ENTROPY_LOSS], lg),
        ],
    )


def _shares(lg: _Logged) -> Section | None:
    return _section(
        "Expert share per layer (train)",
        [
            _panel(
                f"layer {i}: share of routing assignments",
                lg.experts(i),
                lg,
                kind="stacked",
                y_range=SHARE,
            )
            for i in sorted(lg.train)
        ],
        columns=2,
    )


def _routing(lg: _Logged) -> Section | None:
    r = keys.ROUTER
    return _section(
        "Routing entropy and balance (train)",
        [
            _panel("router entropy per token (nats; ln E = uniform)", lg.per_layer(r, "entropy"), lg),
            _panel("marginal entropy H(mean p) (nats)", lg.per_layer(r, "marginal_entropy"), lg),
            _panel("largest expert share (collapse guard)", lg.per_layer(r, "max_frac"), lg, y_range=SHARE),
            _panel("dead experts (no assignment this step)", lg.per_layer(r, "dead_experts"), lg),
            _panel("share imbalance: CV of expert shares", lg.per_layer(r, "cv"), lg),
            _panel("dropped assignments (capacity)", lg.per_layer(r, "dropped_frac"), lg, y_range=SHARE),
            _panel("tokens no expert took (expert choice)", lg.per_layer(r, "unrouted_frac"), lg),
        ],
    )


def _specialisation(lg: _Logged) -> Section | None:
    r, splits = keys.ROUTER, list(keys.SPLIT_PREFIXES.items())
    return _section(
        "Domain specialisation",
        [
            _panel(
                "domain NMI, train: I(domain; expert) / H(domain)",
                lg.per_layer(r, "domain_nmi"),
                lg,
                y_range=SHARE,
            ),
            *[
                _panel(f"domain NMI, {s}", lg.per_layer(e, "domain_nmi"), lg, y_range=SHARE)
                for s, (_, e) in splits
            ],
            _panel("expert weight divergence (0 = copies)", lg.per_layer(r, "expert_divergence"), lg),
            *[
                _panel(f"{s} router entropy per token (nats)", lg.per_layer(e, "entropy"), lg)
                for s, (_, e) in splits
            ],
        ],
    )


def _heatmaps(lg: _Logged) -> Section | None:
    return _section(
        "Domain x expert heatmaps (val, eval)",
        [
            Panel(
                f"layer {i}: P(expert | domain), {split}",
                (keys.layer_key(router, i, keys.DOMAIN_EXPERT),),
                kind="media",
            )
            for split, (_, router) in keys.SPLIT_PREFIXES.items()
            for i in sorted(lg.evals[router])
        ],
        columns=2,
    )


def _training(lg: _Logged) -> Section | None:
    bias = [
        _panel(f"layer {i}: selection bias", lg.experts(i, keys.selection_bias), lg) for i in sorted(lg.train)
    ]
    return _section(
        "Optimisation",
        [
            _panel("learning rate", [keys.TRAIN_LR, keys.TRAIN_ROUTER_LR], lg),
            _panel("gradient norm (before clipping)", [keys.TRAIN_GRAD_NORM], lg),
            _panel("throughput (tokens/s)", [keys.TOKENS_PER_SEC], lg),
            _panel("router noise std", [keys.NOISE_STD], lg),
            _panel("router loss coefficients", [keys.TRAIN_LB_COEF, keys.TRAIN_Z_COEF], lg),
            _panel("steps skipped by the bad-step guard", [keys.TRAIN_SKIPPED_STEPS], lg),
            *bias,
        ],
        is_open=False,
    )


def dashboard_sections(logged: Iterable[str]) -> list[Section]:
    """The dashboard's sections, top to bottom, over the keys ``logged`` (see the module docstring)."""
    lg = _Logged.of(logged)
    built = (_losses(lg), _shares(lg), _routing(lg), _specialisation(lg), _heatmaps(lg), _training(lg))
    return [s for s in built if s is not None]


def panel_keys(sections: Iterable[Section]) -> set[str]:
    """Every key some panel of ``sections`` shows."""
    return {k for s in sections for p in s.panels for k in p.keys}


def as_data(sections: Iterable[Section]) -> list[dict[str, Any]]:
    """The sections as plain JSON-ready data (``scripts/wandb_dashboard.py --print``)."""
    return [asdict(s) for s in sections]


def workspace(sections: list[Section], entity: str, project: str, name: str, auto_panels: bool = False):
    """A ``wandb_workspaces`` saved view of ``sections`` for ``entity/project`` (built offline; its
    ``save()`` needs the network). Panels are grouped by every ``/`` segment of their keys (so wandb's own
    panels, with ``auto_panels``, come in one section per layer); x-axis: the optimizer step."""
    import wandb_workspaces.workspaces as ws

    return ws.Workspace(
        name=name,
        entity=entity,
        project=project,
        sections=[
            ws.Section(
                name=s.name,
                panels=[_wandb_panel(p) for p in s.panels],
                is_open=s.is_open,
                layout_settings=ws.SectionLayoutSettings(columns=s.columns),
            )
            for s in sections
        ],
        settings=ws.WorkspaceSettings(x_axis="Step", group_by_prefix="last"),
        auto_generate_panels=auto_panels,
    )


def _wandb_panel(p: Panel):
    import wandb_workspaces.reports.v2 as wr

    if p.kind == "media":
        return wr.MediaBrowser(title=p.title, media_keys=list(p.keys))
    if p.kind == "stacked":  # every shown run's series would stack together: show one run
        return wr.LinePlot(
            title=p.title,
            x="Step",
            y=list(p.keys),
            plot_type="stacked-area",
            range_y=p.y_range,
            max_runs_to_show=1,
        )
    return wr.LinePlot(title=p.title, x="Step", y=list(p.keys), plot_type="line", range_y=p.y_range)
