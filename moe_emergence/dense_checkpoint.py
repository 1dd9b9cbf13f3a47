"""Checks of a dense GPT-2 checkpoint's weight files, before anything is loaded or written.

``check_weight_files(source, config)`` reads only the safetensors headers (names, shapes: no tensor data) of a
local folder or of a hub id's cached files, and raises ``ConfigError`` naming the file when one is missing,
unreadable or truncated, lacks a weight the model needs, or holds one of another shape than ``config``
says. ``check_loading_info`` applies the same rule to what ``from_pretrained(output_loading_info=True)``
reports (transformers only warns about missing weights and initialises them randomly), which also covers
``pytorch_model.bin`` checkpoints, whose weights cannot be listed without loading them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from moe_emergence.errors import ConfigError

SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
)
BASE_PREFIX = "transformer."  # checkpoints saved from GPT2Model (the hub's gpt2) lack it
SHOWN = 5  # names listed in an error


def expected_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every weight a ``GPT2LMHeadModel`` of ``config`` loads (tied weights once), built
    on the meta device (no memory)."""
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    out, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:  # lm_head.weight is wte.weight when the embeddings are tied
            seen.add(id(tensor))
            out[name] = tuple(tensor.shape)
    return out


def _shown(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def _header(path: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the tensors of one safetensors file, from its header only."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{path}: unreadable or truncated safetensors file ({e})") from e


def _safetensors_files(folder: Path) -> list[Path] | None:
    """The safetensors files of a folder (one, or the shards of an index); None when it has none."""
    index = folder / SAFETENSORS_INDEX
    if (folder / SAFETENSORS).is_file():
        return [folder / SAFETENSORS]
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from e


def _cached_hub_files(repo_id: str) -> list[Path] | None:
    """The hub checkpoint's cached single safetensors file, if it is in the local cache (no download)."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo_id, SAFETENSORS)
    return [Path(path)] if isinstance(path, str) else None


def check_weight_files(source: str | os.PathLike, config: GPT2Config) -> None:
    """``ConfigError`` naming the file when the checkpoint's weights do not fit ``config`` (module docstring).
    A hub id whose files are not cached yet is left to ``check_loading_info`` after the download."""
    folder = Path(source)
    if folder.is_dir():
        files = _safetensors_files(folder)
        if files is None:
            if (folder / TORCH_BIN).is_file():
                return  # checked after loading (check_loading_info)
            raise ConfigError(
                f"{folder}: no weights file ({SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_BIN}); "
                "a GPT-2 checkpoint folder needs its weights (save_pretrained writes them)"
            )
    else:
        files = _cached_hub_files(os.fspath(source))
        if files is None:
            return
    stored: dict[str, tuple[int, ...]] = {}
    for path in files:
        if not path.is_file():
            raise ConfigError(f"{path}: weights file listed in {SAFETENSORS_INDEX} is missing")
        stored.update(_header(path))
    _compare(files[0] if len(files) == 1 else folder, stored, expected_shapes(config))


def _compare(where: Path, stored: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> None:
    missing, wrong = [], []
    for name, shape in expected.items():
        found = stored.get(name, stored.get(name.removeprefix(BASE_PREFIX)))
        if found is None:
            missing.append(name)
        elif found != shape:
            wrong.append(f"{name} {list(found)} (config.json needs {list(shape)})")
    if missing:
        raise ConfigError(
            f"{where}: the checkpoint lacks {len(missing)} of the {len(expected)} weights the model needs "
            f"({_shown(missing)}); it is incomplete or not this config's model"
        )
    if wrong:
        raise ConfigError(
            f"{where}: {len(wrong)} weights have another shape than config.json says: {_shown(wrong)}; "
            "the weights and config.json belong to different models"
        )


def check_loading_info(source: str | os.PathLike, info: dict) -> None:
    """``ConfigError`` when ``from_pretrained(..., output_loading_info=True)`` left weights missing (randomly
    initialised) or of another shape."""
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or ())
    if missing:
        raise ConfigError(
            f"{os.fspath(source)}: the checkpoint lacks {len(missing)} weights the model needs "
            f"({_shown(missing)}); it is incomplete or not this config's model"
        )
    if mismatched:
        raise ConfigError(
            f"{os.fspath(source)}: {len(mismatched)} weights have another shape than its config.json says "
            f"({_shown(mismatched)}); the weights and config.json belong to different models"
        )


__all__ = ["check_loading_info", "check_weight_files", "expected_shapes"]


def hub_access(source: str | os.PathLike, timeout_s: float = 3.0) -> dict[str, bool]:
    """Keyword arguments for ``from_pretrained(source, ...)``: ``{"local_files_only": True}`` when ``source``
    names a hub id (no such local path) and the hub's endpoint cannot be reached (one TCP connection,
    ``timeout_s``), so loading uses the local cache or fails at once with transformers' own offline message
    instead of retrying for ~30 s; ``{}`` otherwise (a local folder, offline mode already on, or a reachable hub)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if Path(source).expanduser().exists() or constants.HF_HUB_OFFLINE:
        return {}
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
    except OSError:
        return {"local_files_only": True}
    return {}
