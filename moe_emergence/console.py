"""The command lines print their own progress and results: library chatter a user need not act on is off.

``quiet_libraries()`` is called first thing by every script (``scripts/*.py``, ``training.cli``).
"""

from __future__ import annotations

import argparse
import logging

from moe_emergence.errors import ConfigError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's one-line ``error:`` (exit 2, through ``errors.run_cli``) instead of the
    usage block plus ``prog: error:``."""

    def error(self, message: str):
        raise ConfigError(f"{message} (usage: {' '.join(self.format_usage().split()[1:])})")


class _DropTiedWeightNotice(logging.Filter):
    """accelerate warns ``Removed shared tensor {'lm_head.weight'}`` at every save: GPT-2's output layer is
    tied to its embedding, so the tensor is expected to be stored once. Nothing a user has to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


def quiet_libraries() -> None:
    """The command line prints its own progress bar and summary: no per-file progress bars of transformers
    (``Loading weights``, ``Writing model shards``) and no notice about the tied output layer."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.getLogger("accelerate.utils.other").addFilter(_DropTiedWeightNotice())
