"""Model, tokenizer and corpus of a run, and the dense -> MoE switch.

``model.base: tiny`` builds a small ``GPT2LMHeadModel`` from the ``tiny_*`` sizes; its tokenizer is the
byte-level BPE the data pipeline trains (saved in ``<run>/tokenizer``). A hub id or a folder is loaded
with ``from_pretrained`` (only GPT-2 checkpoints) and ``AutoTokenizer``; the data pipeline tokenizes with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase

from moe_emergence.data.sources import check_source_files
from moe_emergence.dense_checkpoint import check_weight_files, hub_access
from moe_emergence.errors import ConfigError, as_user_error
from moe_emergence.experts import backend_name
from moe_emergence.kernels import BACKENDS, unsupported_reason
from moe_emergence.layer import whole_layer_graph_unsupported
from moe_emergence.lm_head import align_lm_head
from moe_emergence.modeling import GPT2MoEForCausalLM
from moe_emergence.training.config import ModelConfig, RunConfig
from moe_emergence.upcycle import load_dense_gpt2, upcycle

TOKENIZER_PROBE = "def add(a, b): return a + b  # The 3 cats sat."  # any usable tokenizer encodes this


def dropout_overrides(p: float) -> dict[str, float]:
    """GPT2Config keys of the three dropouts (residual, embedding, attention), all set to ``p``."""
    return {"resid_pdrop": p, "embd_pdrop": p, "attn_pdrop": p}


def build_tiny_gpt2(
    cfg: ModelConfig, vocab_size: int, bos_id: int | None, eos_id: int | None
) -> GPT2LMHeadModel:
    """A randomly initialised small GPT-2 (``tiny_*`` sizes); the caller seeds the RNG."""
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=cfg.tiny_n_positions,
        n_embd=cfg.tiny_n_embd,
        n_layer=cfg.tiny_n_layer,
        n_head=cfg.tiny_n_head,
        **dropout_overrides(cfg.dropout or 0.0),
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )
    return GPT2LMHeadModel(config)


@dataclass
class BaseInfo:
    """What the run needs to know about its base before building anything: the tokenizer (None for
    ``tiny``: the data pipeline trains one), the context length that ``data.seq_len`` must fit in, and the
    MLP's widths D and F (the experts' sizes: which backend ``auto`` picks)."""

    tokenizer: PreTrainedTokenizerBase | None
    max_positions: int
    d_model: int
    d_ff: int


def mixed_precision(setting: str, cpu: bool) -> str:
    """``train.mixed_precision`` for accelerate: ``auto`` = bf16 on a GPU that has it, else no."""
    if setting != "auto":
        return setting
    gpu = torch.cuda.is_available() and not cpu
    return "bf16" if gpu and torch.cuda.is_bf16_supported() else "no"


def check_base(cfg: RunConfig) -> BaseInfo:
    """Check everything that depends on the model before anything is written; ``ConfigError`` (one line,
    naming the key or file) for a missing or non-GPT-2 base, a weights file that is missing, truncated,
    incomplete or of other shapes than its config, a missing or unusable tokenizer (or one that does not fit
    the embeddings), MoE layers outside the model's blocks, an experts backend that cannot run here, a
    ``seq_len`` beyond the model's positions, and data files that do not exist."""
    m = cfg.model
    if m.base == "tiny":
        dims = (m.tiny_n_layer, m.tiny_n_embd, 4 * m.tiny_n_embd)
        info = BaseInfo(None, m.tiny_n_positions, *dims[1:])
        blocks_from = f"model.tiny_n_layer={m.tiny_n_layer}"
    else:
        config = _base_config(m.base)
        check_weight_files(m.base, config)
        dims = (config.n_layer, config.n_embd, config.n_inner or 4 * config.n_embd)
        info = BaseInfo(_base_tokenizer(m.base, config), config.n_positions, *dims[1:])
        blocks_from = f"n_layer={config.n_layer} of model.base={m.base!r}"
    if m.moe is not None:
        _check_moe_fits(cfg, *dims, blocks_from)
    if cfg.data.seq_len > info.max_positions:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} is beyond the model's {info.max_positions} positions "
            f"({'model.tiny_n_positions' if m.base == 'tiny' else 'n_positions of ' + repr(m.base)}); "
            f"use data.seq_len <= {info.max_positions}"
        )
    with as_user_error("data", ValueError):
        check_source_files(cfg.data)
    return info


def _base_config(base: str) -> GPT2Config:
    where = f"model.base={base!r}"
    path = Path(base).expanduser()
    if not path.exists() and (path.is_absolute() or base.startswith((".", "~"))):
        raise ConfigError(f"{where}: no such folder; use 'tiny', a hub id such as 'gpt2' or a GPT-2 folder")
    with as_user_error(f"{where}: cannot load its config (not a GPT-2 folder, or hub id unreachable)"):
        config = AutoConfig.from_pretrained(base, **hub_access(base))
    if config.model_type != "gpt2":
        raise ConfigError(
            f"{where} is a {config.model_type!r} checkpoint; model.base must be a dense GPT-2 "
            "(model_type 'gpt2'): 'tiny', a hub id such as 'gpt2' or a local GPT-2 folder"
        )
    return config


def _base_tokenizer(base: str, config: GPT2Config) -> PreTrainedTokenizerBase:
    """The base's tokenizer, refused when it cannot be loaded, encodes text to nothing (a folder without
    tokenizer files gets an empty one), has no EOS token or more tokens than the checkpoint has embeddings."""
    where = f"model.base={base!r}"
    with as_user_error(f"{where}: cannot load its tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(base, **hub_access(base))
    if not tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]:
        raise ConfigError(
            f"{where}: it has no usable tokenizer (it has {len(tokenizer)} tokens and encodes text to nothing); "
            "a GPT-2 folder needs tokenizer.json or vocab.json + merges.txt (tokenizer.save_pretrained)"
        )
    if tokenizer.eos_token_id is None:
        raise ConfigError(
            f"{where}: its tokenizer has no eos_token; documents are joined with EOS, so one is required"
        )
    if len(tokenizer) > config.vocab_size:
        raise ConfigError(
            f"{where}: its tokenizer has {len(tokenizer)} tokens but the checkpoint only "
            f"{config.vocab_size} embeddings; the tokenizer does not match the checkpoint"
        )
    return tokenizer


def _grouped_mm_fits(d_model: int, d_ff: int) -> bool:
    from moe_emergence.kernels.grouped_mm import fits  # lazy: backend modules load only when asked for

    return fits(d_model, d_ff)


def _check_moe_fits(cfg: RunConfig, n_layer: int, d_model: int, d_ff: int, blocks_from: str) -> None:
    """``model.moe.layers`` within the model's blocks; ``model.moe.backend`` able to run on this device."""
    moe = cfg.model.moe
    if moe.layers != "all" and max(moe.layers) >= n_layer:
        bad = [i for i in moe.layers if i >= n_layer]
        raise ConfigError(
            f"model.moe.layers={moe.layers} is invalid: blocks {bad} do not exist; the model has {n_layer} "
            f'blocks ({blocks_from}), so indices 0..{n_layer - 1} or "all"'
        )
    if moe.backend in BACKENDS:
        gpu = torch.cuda.is_available() and not cfg.train.cpu
        device = torch.device("cuda" if gpu else "cpu")
        why = unsupported_reason(moe.backend, device)
        if why is None and moe.backend == "grouped_mm" and not _grouped_mm_fits(d_model, d_ff):
            why = f"it needs the widths (here {d_model} and {d_ff}) to be multiples of 8"
        if why is not None:
            raise ConfigError(
                f"model.moe.backend={moe.backend!r} cannot run here: {why}; use 'auto' or 'eager'"
            )


def cuda_graphs_on(
    cfg: RunConfig, base: BaseInfo, device: torch.device, fsdp: bool, processes: int = 1
) -> tuple[str | None, str | None]:
    """``train.cuda_graphs`` resolved: (what runs from CUDA graphs, ``"model"``, ``"layers"``, ``"experts"`` or
    None; why not the whole model or layers, or None). Graphs (``kernels/cuda_graph.py``) need a GPU, an
    uncompiled model not sharded by FSDP (its unsharded parameters move between steps) and a backend that never
    waits on the device: ``triton``, or ``grouped_mm`` in bf16 on compute capability 9.x or 10.x (Hopper,
    datacenter Blackwell; elsewhere ``torch._grouped_mm`` reads its group offsets on the host), never ``eager``.
    The whole model or whole layers also need token-choice routing without capacity, random routing or expert
    dropout (``layer.whole_layer_graph_unsupported``), and the whole model one process (DDP's forward
    broadcasts buffers and its backward all-reduces: not inside a graph). ``auto`` takes the most of that which
    holds when the run has one process (several, under DDP: not verified yet); ``model``, ``layers`` or
    ``experts`` where they cannot run is a ``ConfigError`` naming the cause."""
    setting, moe, t = cfg.train.cuda_graphs, cfg.model.moe, cfg.train
    if setting == "none":
        return None, "train.cuda_graphs=none"
    gpu = moe is not None and device.type == "cuda"
    backend = backend_name(moe.backend, device, base.d_model, base.d_ff) if gpu else None
    precision = mixed_precision(t.mixed_precision, t.cpu)
    if moe is None:
        why = "model.moe is null (a dense run has no MoE layers)"
    elif device.type != "cuda":
        why = f"the run is on the {device.type}"
    elif t.compile:
        why = "train.compile=true (the compiler captures its own graphs: compile_mode=reduce-overhead)"
    elif fsdp:
        why = "FSDP moves the unsharded parameters between steps"
    elif backend == "eager":
        why = f"model.moe.backend={moe.backend!r} runs the eager experts, which wait on the device"
    elif backend == "grouped_mm" and precision != "bf16":
        why = f"the grouped_mm experts wait on the device outside bf16 (train.mixed_precision resolves to {precision})"
    elif backend == "grouped_mm" and torch.cuda.get_device_capability(device)[0] not in (9, 10):
        why = "the grouped_mm experts wait on the device on GPUs other than compute capability 9.x and 10.x"
    elif setting == "auto" and processes > 1:
        return (
            None,
            f"{processes} processes: CUDA-graphed MoE layers are not verified under DDP yet "
            "(train.cuda_graphs=layers or experts)",
        )
    elif setting == "model" and processes > 1:
        raise ConfigError(
            f"train.cuda_graphs='model' cannot run here: {processes} processes (DDP's forward and backward "
            "communicate, which a CUDA graph of the whole model cannot hold); use 'layers', 'experts' or 'none'"
        )
    else:
        why = whole_layer_graph_unsupported(moe)
        if setting in ("model", "layers") and why is not None:
            raise ConfigError(
                f"train.cuda_graphs={setting!r} cannot run here: {why}; use 'auto', 'experts' or 'none'"
            )
        if setting == "experts" or why is not None:
            return "experts", why
        return ("model" if setting == "auto" else setting), None
    if setting != "auto":
        raise ConfigError(f"train.cuda_graphs={setting!r} cannot run here: {why}; use 'auto' or 'none'")
    return None, why


def said_cuda_graphs(what: str | None, why: str | None) -> str:
    """The run's first line on a GPU, after ``train.cuda_graphs=<setting>: ``: what ``cuda_graphs_on`` chose."""
    if what == "model":
        return "on: each micro-batch's whole step, forward, objective and backward, runs from one CUDA graph"
    if what == "layers":
        return "on: each MoE layer runs whole from CUDA graphs, router and experts together"
    if what == "experts":
        return "on: each MoE layer's experts run from CUDA graphs" + (
            f"; not the whole layer: {why}" if why else ""
        )
    return f"off: {why}"


def graph_layers(model: torch.nn.Module, what: str) -> None:
    """Give every MoE layer its own CUDA graphs (``train.cuda_graphs``): ``what`` = ``"layers"``, a
    ``LayerGraph`` of the whole layer, or ``"experts"``, an ``ExpertsGraph`` of its ``ExpertBank``; ``"model"``:
    none (the trainer's ``StepGraph`` captures the layers with the rest of the micro-batch's step)."""
    from moe_emergence.kernels.cuda_graph import ExpertsGraph, LayerGraph

    for layer in model.moe_layers().values():
        if what == "layers":
            layer.cuda_graph, layer.experts.cuda_graph = LayerGraph(), None
        elif what == "experts":
            layer.cuda_graph, layer.experts.cuda_graph = None, ExpertsGraph()
        else:
            layer.cuda_graph = layer.experts.cuda_graph = None


def graph_captures(model: torch.nn.Module, step_graph=None) -> int:
    """CUDA-graph signatures captured so far by the model's MoE layers (``graph_layers``) or by ``step_graph``
    (the trainer's ``StepGraph``), dropped ones included."""
    graphs = [(layer.cuda_graph, layer.experts.cuda_graph) for layer in model.moe_layers().values()]
    layers = sum(g.captures for pair in graphs for g in pair if g is not None)
    return layers + (step_graph.captures if step_graph is not None else 0)


def model_dims(model) -> dict[str, int | None]:
    """The dimensions that fix a model's parameter shapes (stored in checkpoints, checked on resume)."""
    c = model.config
    keys = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")
    return {k: getattr(c, k, None) for k in keys}


def build_model(cfg: RunConfig, tokenizer) -> GPT2LMHeadModel:
    """The dense model at step 0 (MoE when ``upcycle_at_step == 0`` and ``moe`` is set)."""
    m = cfg.model
    if m.base == "tiny":
        model = build_tiny_gpt2(m, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    else:
        model = load_dense_gpt2(m.base, **({} if m.dropout is None else dropout_overrides(m.dropout)))
        if len(tokenizer) > model.config.vocab_size:
            raise ConfigError(
                f"model.base={m.base!r}: its tokenizer has {len(tokenizer)} tokens but the model only "
                f"{model.config.vocab_size} embeddings; the tokenizer does not match the checkpoint"
            )
    # transformers finds no loss type in the class name GPT2LMHeadModel and warns at every loss call: logged once,
    # but under torch.compile each call is a graph break. It is a causal LM (GPT2MoEForCausalLM's name says so).
    model.loss_type = "ForCausalLM"
    align_lm_head(model)  # as GPT2MoEForCausalLM's: the dense phase trains on the same aligned head GEMMs
    if m.moe is not None and m.upcycle_at_step == 0:
        model = upcycle(model, m.moe)
    return model


def to_moe(dense: GPT2LMHeadModel, cfg: RunConfig) -> GPT2MoEForCausalLM:
    """Upcycle the current dense weights (``init`` from ``model.moe``), in train mode. A model sharded by
    FSDP2 (DTensor parameters) is gathered into a plain copy first (``unsharded``)."""
    if cfg.model.moe is None:
        raise ValueError("model.moe is null: a dense run is never upcycled")
    model = upcycle(unsharded(dense), cfg.model.moe)
    model.train()
    return model


def unsharded(model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """``model`` itself, or, when FSDP2 sharded it (DTensor parameters), a new plain model of the same
    config holding the gathered full weights on this process's device (a collective: every process calls
    it)."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    device = next(iter(full.values())).device
    copy = type(model)(model.config).to(device)
    copy.load_state_dict(full)
    copy.loss_type = getattr(model, "loss_type", None)
    return copy


def compile_in_place(model: torch.nn.Module, backend: str, mode: str = "default") -> None:
    """``train.compile``: ``torch.compile`` the model's forward in place (``nn.Module.compile``), before
    ``accelerator.prepare``. Not accelerate's ``TorchDynamoPlugin``: it wraps the model in an
    ``OptimizedModule`` whose state-dict keys carry an ``_orig_mod.`` prefix, and ``save_state`` stores them as
    they are, so checkpoints of compiled runs would not load into uncompiled ones or into the analysis tools.
    In place, the model, its state dict, checkpoints and ``save_pretrained`` are unchanged. ``mode`` is
    inductor's; torch passes ``"default"`` to no other backend (``TrainConfig`` allows no other with them)."""
    model.compile(backend=backend, mode=mode)


def is_moe(model) -> bool:
    return isinstance(model, GPT2MoEForCausalLM)


def save_final(model, tokenizer, path: str | Path, state_dict=None) -> None:
    """``save_pretrained`` model + tokenizer: loadable with ``AutoModelForCausalLM.from_pretrained``
    (after ``import moe_emergence`` for MoE models)."""
    path = Path(path)
    model.save_pretrained(path, state_dict=state_dict)
    tokenizer.save_pretrained(path)
