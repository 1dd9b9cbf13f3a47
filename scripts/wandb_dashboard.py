"""Save the routing dashboard as a saved view ("workspace") of a wandb project. Needs the network.

    wandb sync runs/NAME/wandb/offline-run-*       # an offline run's data goes to the server first
    python scripts/wandb_dashboard.py runs/NAME [RUN_DIR ...] [--entity E] [--project P] [--name VIEW]
    python scripts/wandb_dashboard.py runs/NAME --print      # the panels as JSON: no wandb, no network

The panels are chosen from the keys the runs logged (their metrics.jsonl): per-layer stacked expert
shares, router entropy and balance, domain NMI, the domain x expert heatmaps, losses (docs/training.md,
"Watching a run in wandb"). The project is the runs' ``log.project``; the entity is your default wandb
entity unless ``--entity`` is given. Needs the package wandb-workspaces (``pip install -e '.[dashboard]'``),
a wandb API key (``wandb login``) and the network; any of them missing, or a refusal from the server, is one
``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_emergence.console import ArgumentParser
from moe_emergence.errors import ConfigError, run_cli  # noqa: E402
from moe_emergence.telemetry import dashboard, read_metrics  # noqa: E402

API_TIMEOUT_S = 30


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run folders (their metrics.jsonl and config.yaml)"
    )
    p.add_argument("--entity", help="wandb entity (user or team); default: your default entity")
    p.add_argument("--project", help="wandb project; default: the runs' log.project")
    p.add_argument("--name", default="MoE routing", help="the saved view's name (default: %(default)s)")
    p.add_argument(
        "--all-panels", action="store_true", help="also wandb's own panel for every key, a section per layer"
    )
    p.add_argument("--print", action="store_true", help="print the panels as JSON and exit (offline)")
    return p.parse_args(argv)


def logged_keys(run_dirs: list[str]) -> set[str]:
    """Every key the runs wrote to their metrics.jsonl."""
    out: set[str] = set()
    for run in run_dirs:
        path = Path(run) / "metrics.jsonl"
        if not path.is_file():
            raise ConfigError(f"{run!r} is not a run folder: it has no metrics.jsonl")
        try:
            out |= {k for record in read_metrics(path) for k in record}
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read {str(path)!r}: {e}") from e
    if not out:
        raise ConfigError(f"no metrics logged yet in {', '.join(run_dirs)}")
    return out


def project_of(run_dirs: list[str]) -> str:
    """The runs' common ``log.project`` (from each run's config.yaml)."""
    projects = set()
    for run in run_dirs:
        path = Path(run) / "config.yaml"
        try:
            projects.add(yaml.safe_load(path.read_text())["log"]["project"])
        except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
            raise ConfigError(f"cannot read log.project from {str(path)!r} ({e}); pass --project") from e
    if len(projects) > 1:
        raise ConfigError(f"the runs log to different projects {sorted(projects)}; pass --project")
    return projects.pop()


def save(sections: list[dashboard.Section], args: argparse.Namespace, project: str) -> str:
    """Save the view on the wandb server; its URL. Every failure here is the environment's (package,
    key, network, server), reported as one line."""
    try:
        import wandb
        import wandb_workspaces  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"saving the dashboard needs wandb-workspaces: pip install -e '.[dashboard]' ({e})"
        ) from e
    try:
        api = wandb.Api(timeout=API_TIMEOUT_S)  # checks the key with the server
        entity = args.entity or api.default_entity
        if not entity:
            raise ConfigError("wandb has no default entity for this key; pass --entity")
        view = dashboard.workspace(sections, entity, project, args.name, auto_panels=args.all_panels)
        return view.save().url
    except ConfigError:
        raise
    except Exception as e:  # no key, no network, server refusal: not a bug of ours
        raise ConfigError(
            f"cannot save the dashboard to wandb (it needs an API key and the network): {type(e).__name__}: {e}"
        ) from e


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    sections = dashboard.dashboard_sections(logged_keys(args.runs))
    if args.print:
        print(json.dumps(dashboard.as_data(sections), indent=1))
        return 0
    project = args.project or project_of(args.runs)
    url = save(sections, args, project)
    print(f"dashboard saved: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
