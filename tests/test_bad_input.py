"""Every bad input through the training CLI: exit status 2, ONE ``error:`` line naming the key or file, no
traceback, nothing written (no run folder, the data cache unchanged), and no training step taken.

One table: config values, YAML files, base checkpoints and their tokenizers, data files and data config,
positions, MoE layers, the upcycle step. Placeholders in a case: ``{bases}`` (the broken base checkpoints),
``{files}`` (the broken data files), ``{tmp}`` (the test's own folder).
"""

from __future__ import annotations

import errno
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from test_reliability import assert_one_error_line, run_cli
from test_training_run import TINY

from moe_emergence.data import build_corpus
from moe_emergence.data import corpus as corpus_mod
from moe_emergence.training.config import config_from_dict

GPT2_SIZES = dict(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2)


@dataclass(frozen=True)
class Case:
    id: str
    overrides: tuple[str, ...]
    pattern: str  # searched in the one error line; names the key or file
    extra_yaml: str = ""  # appended to the tiny config file
    config_text: str | None = None  # replaces the tiny config file (bytes-level problems: latin-1)
    disk_full: bool = False  # every dataset write fails with ENOSPC, into a cache folder that does not exist
    after_open: bool = False  # found while reading data contents (after the run folder was opened)


CASES = [
    # ---------------------------------------------------------------- config values
    Case("lr-inf", ("optim.lr=.inf",), r"optim\.lr=inf is invalid: expected a finite number"),
    Case("lr-nan", ("optim.lr=.nan",), r"optim\.lr=nan is invalid: expected a finite number"),
    Case("lr-zero", ("optim.lr=0",), r"optim\.lr=0\.0 is invalid: a number > 0"),
    Case("lr-string-inf", ("optim.lr=1e999",), r"optim\.lr='1e999' is invalid: expected a finite number"),
    Case(
        "noise-inf",
        ("model.moe.noise_std=-.inf",),
        r"model\.moe\.noise_std=-inf is invalid: expected a finite",
    ),
    Case("eval-fraction-nan", ("data.eval_fraction=.nan",), r"data\.eval_fraction=nan is invalid"),
    Case("betas-inf", ("optim.betas=[0.9, .inf]",), r"optim\.betas\[1\]=inf is invalid"),
    Case(
        "eval-batch-negative",
        ("eval.batch_size=-1",),
        r"eval\.batch_size=-1 is invalid: null .* or an integer >= 1",
    ),
    Case("eval-batch-zero", ("eval.batch_size=0",), r"eval\.batch_size=0 is invalid"),
    Case(
        "eval-split-without-val",
        ("data.val_fraction=0",),
        r"eval\.split='val' is invalid: 'eval' when data\.val_fraction=0: there is no val split",
    ),
    Case(
        "eval-final-split-twice",
        ("eval.final_split=val",),
        r"eval\.final_split='val' is invalid: null or a split other than eval\.split='val'",
    ),
    Case("eval-max-batches-gone", ("eval.max_batches=20",), r"unknown key 'eval\.max_batches'.*'max_blocks'"),
    Case("train-seed", ("train.seed=-1",), r"train\.seed=-1 is invalid: an integer in \[0, 4294967295\]"),
    Case("data-seed", ("data.seed=-1",), r"data\.seed=-1 is invalid: an integer in \[0, 4294967295\]"),
    Case(
        "top-k", ("model.moe.top_k=5",), r"model\.moe\.top_k=5 is invalid: an integer in \[1, num_experts=4\]"
    ),
    Case("layers-dup", ("model.moe.layers=[0, 0]",), r"model\.moe\.layers=\[0, 0\] is invalid: .*unique"),
    Case(
        "schedule",
        ("model.moe.lb_schedule={kind: step, step_size: 0, gamma: 0.5}",),
        r"model\.moe\.lb_schedule\.step_size=0",
    ),
    Case(
        "tiny-heads",
        ("model.tiny_n_head=3",),
        r"model\.tiny_n_embd=32 is invalid: a multiple of tiny_n_head=3",
    ),
    Case("collapse-nan", ("collapse.max_frac=.nan",), r"collapse\.max_frac=nan is invalid"),
    Case(
        "num-problems",
        ("data.domains.math.num_problems=0",),
        r"data\.domains\.math\.num_problems=0 .*an integer >= 1",
    ),
    Case(
        "weighted-no-weights",
        ("data.mixing=weighted",),
        r"data\.weights=\{\} is invalid: mixing=weighted needs one weight",
    ),
    Case(
        "template-positional",
        ("data.domains.math.template='{0}'",),
        r"data\.domains\.math\.template='\{0\}'.*record field names",
    ),
    Case(
        "chapter-regex",
        ("data.domains.prose.chapter_pattern=(",),
        r"data\.domains\.prose\.chapter_pattern='\(' .*regular expression",
    ),
    Case("backend-cpu", ("model.moe.backend=triton",), r"model\.moe\.backend='triton' cannot run here"),
    Case(
        "cuda-graphs-cpu",
        ("train.cuda_graphs=experts",),
        r"train\.cuda_graphs='experts' cannot run here: the run is on the cpu; use 'auto' or 'none'",
    ),
    Case(
        "cuda-graphs-layers-cpu",
        ("train.cuda_graphs=layers",),
        r"train\.cuda_graphs='layers' cannot run here: the run is on the cpu; use 'auto' or 'none'",
    ),
    Case(
        "cuda-graphs-model-cpu",
        ("train.cuda_graphs=model",),
        r"train\.cuda_graphs='model' cannot run here: the run is on the cpu; use 'auto' or 'none'",
    ),
    Case(
        "cuda-graphs-model-compile",
        ("train.cuda_graphs=model", "train.compile=true"),
        r"train\.cuda_graphs='model' is invalid: 'auto' or 'none' with train\.compile=true",
    ),
    Case(
        "cuda-graphs-compile",
        ("train.cuda_graphs=layers", "train.compile=true"),
        r"train\.cuda_graphs='layers' is invalid: 'auto' or 'none' with train\.compile=true",
    ),
    Case(
        "cuda-graphs-experts-compile",
        ("train.cuda_graphs=experts", "train.compile=true"),
        r"train\.cuda_graphs='experts' is invalid: 'auto' or 'none' with train\.compile=true",
    ),
    Case(
        "cuda-graphs-value",
        ("train.cuda_graphs=on",),
        r"train\.cuda_graphs: yes/on/true \(YAML reads them as True\) is not allowed; choose one of 'auto', "
        r"'model', 'layers', 'experts', 'none'",
    ),
    # ---------------------------------------------------------------- positions, layers, upcycle step
    Case(
        "layers-tiny",
        ("model.moe.layers=[5]",),
        r"model\.moe\.layers=\[5\] is invalid: .*2 blocks \(model\.tiny_n_layer=2\)",
    ),
    Case(
        "upcycle-at-end",
        ("model.upcycle_at_step=6",),
        r"model\.upcycle_at_step=6 is invalid: an integer < train\.steps=6",
    ),
    Case("upcycle-late", ("model.upcycle_at_step=9",), r"model\.upcycle_at_step=9 is invalid"),
    Case(
        "seq-len-tiny",
        ("data.seq_len=128",),
        r"data\.seq_len=128 is beyond the model's 64 positions \(model\.tiny_n_positions\)",
    ),
    # ---------------------------------------------------------------- YAML files
    Case(
        "yaml-dup-top",
        (),
        r"tiny\.yaml: duplicate key 'train' at line \d+ \(first at line \d+\)",
        extra_yaml="train: {steps: 3}\n",
    ),
    Case(
        "yaml-dup-nested",
        (),
        r"tiny\.yaml: duplicate key 'lr' at line \d+",
        extra_yaml="optim2:\n  lr: 1\n  lr: 2\n",
    ),
    Case(
        "yaml-dup-override",
        ("model.moe={num_experts: 2, num_experts: 4}",),
        r"override 'model\.moe=.*': duplicate key 'num_experts' in the value",
    ),
    Case(
        "yaml-malformed",
        (),
        r"tiny\.yaml: malformed YAML at line \d+, column \d+",
        extra_yaml="train: [1, 2\n",
    ),
    Case(
        "yaml-not-utf8",
        (),
        r"tiny\.yaml: cannot read the config file",
        config_text="log: {run_name: caf\xe9}\n",
    ),
    Case(
        "yaml-missing-base",
        (),
        r"config file .*nowhere\.yaml' does not exist",
        config_text="base: nowhere.yaml\n",
    ),
    # ---------------------------------------------------------------- base checkpoints and tokenizers
    Case("base-missing", ("model.base={bases}/nope",), r"model\.base=.*nope.: no such folder"),
    Case("base-not-gpt2", ("model.base={bases}/neox",), r"model\.base=.*neox.* is a 'gpt_neox' checkpoint"),
    Case(
        "base-no-weights",
        ("model.base={bases}/no-weights",),
        r"no-weights: no weights file \(model\.safetensors",
    ),
    Case(
        "base-truncated",
        ("model.base={bases}/truncated",),
        r"truncated/model\.safetensors: unreadable or truncated",
    ),
    Case(
        "base-shape",
        ("model.base={bases}/wrong-shape",),
        r"wrong-shape/model\.safetensors: \d+ weights have another shape .*wte\.weight \[300, 16\] \(config\.json needs \[300, 32\]\)",
    ),
    Case(
        "base-missing-keys",
        ("model.base={bases}/incomplete",),
        r"incomplete/model\.safetensors: the checkpoint lacks 4 of the 28 weights .*transformer\.h\.1\.mlp\.c_fc",
    ),
    Case(
        "base-missing-shard",
        ("model.base={bases}/sharded",),
        r"sharded/model-00002-of-00002\.safetensors: weights file listed in model\.safetensors\.index\.json is missing",
    ),
    Case(
        "base-no-tokenizer",
        ("model.base={bases}/no-tokenizer",),
        r"model\.base=.*no-tokenizer.*no usable tokenizer",
    ),
    Case(
        "base-bad-tokenizer",
        ("model.base={bases}/bad-tokenizer",),
        r"model\.base=.*bad-tokenizer.*cannot load its tokenizer",
    ),
    Case(
        "base-layers",
        ("model.base={bases}/good", "model.moe.layers=[2]"),
        r"model\.moe\.layers=\[2\] is invalid: .*n_layer=2 of model\.base=.*good",
    ),
    Case(
        "base-seq-len",
        ("model.base={bases}/good", "data.seq_len=128"),
        r"data\.seq_len=128 is beyond the model's 64 positions \(n_positions of .*good",
    ),
    # ---------------------------------------------------------------- data files and cache
    Case(
        "data-no-file",
        ("data.domains.math={type: files, paths: [{files}/missing.jsonl]}",),
        r"data\.domains\.math .*missing\.jsonl' matches no file",
    ),
    Case(
        "data-suffix",
        ("data.domains.math={type: files, paths: [{files}/notes.csv]}",),
        r"data\.domains\.math .*notes\.csv has unsupported suffix",
    ),
    Case(
        "data-stdlib",
        ("data.domains.code.paths=[nowhere_at_all/*.py]",),
        r"data\.domains\.code .*match no standard-library",
    ),
    Case(
        "jsonl-bad-line",
        ("data.domains.math={type: files, paths: [{files}/bad.jsonl]}",),
        r"bad\.jsonl line 3: not valid JSON",
        after_open=True,
    ),
    Case(
        "jsonl-not-object",
        ("data.domains.math={type: files, paths: [{files}/list.jsonl]}",),
        r"list\.jsonl line 2: expected a JSON object",
        after_open=True,
    ),
    Case(
        "jsonl-no-field",
        ("data.domains.math={type: files, paths: [{files}/nofield.jsonl]}",),
        r"nofield\.jsonl line 1: text_field='text' is missing",
        after_open=True,
    ),
    Case(
        "txt-not-utf8",
        ("data.domains.prose={type: files, paths: [{files}/latin1.txt]}",),
        r"latin1\.txt is not UTF-8 text",
        after_open=True,
    ),
    Case(
        "gutenberg-start-only",
        ("data.domains.prose={type: files, paths: [{files}/half.txt]}",),
        r"half\.txt: Project Gutenberg START marker on line 2 .*no END marker after it.*strip_gutenberg: false",
        after_open=True,
    ),
    Case(
        "domain-empty",
        ("data.domains.prose.min_chars=1000000",),
        r"data\.domains\.prose .*is empty after filtering",
        after_open=True,
    ),
    Case(
        "split-too-small",
        ("train.batch_size=100000",),
        r"training split has \d+ blocks, fewer than one optimizer step",
        after_open=True,
    ),
    Case(
        "cache-disk-full",
        ("data.cache_dir={tmp}/fresh-cache",),
        r"data\.cache_dir=.*fresh-cache.*cannot write the prepared corpus to .*fresh-cache/\w+: No space left on device",
        disk_full=True,
        after_open=True,
    ),
]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> Path:
    """A good tiny GPT-2 checkpoint (2 blocks, 64 positions) with its tokenizer, and broken copies of it."""
    from safetensors.torch import load_file, save_file
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig

    from moe_emergence.data.tokenizer import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("bases")
    good = root / "good"
    GPT2LMHeadModel(GPT2Config(**GPT2_SIZES, bos_token_id=0, eos_token_id=0)).save_pretrained(good)
    words = [f"w{i} x{i * 7} {'ab' * (i % 5)} def add(a, b): return a + b" for i in range(2000)]
    train_bpe_tokenizer(words, 300, model_max_length=64).save_pretrained(good)
    weights = good / "model.safetensors"

    def copy(name: str) -> Path:
        return Path(shutil.copytree(good, root / name))

    (copy("no-weights") / "model.safetensors").unlink()
    with (copy("truncated") / "model.safetensors").open("r+b") as f:
        f.truncate(weights.stat().st_size - 100)
    narrow = GPT2LMHeadModel(GPT2Config(**{**GPT2_SIZES, "n_embd": 16}))
    narrow.save_pretrained(root / "narrow")
    shutil.copy(root / "narrow" / "model.safetensors", copy("wrong-shape") / "model.safetensors")
    state = load_file(weights)
    kept = {k: v for k, v in state.items() if not k.startswith("transformer.h.1.mlp.")}
    save_file(kept, copy("incomplete") / "model.safetensors", metadata={"format": "pt"})
    sharded = copy("sharded")
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    index = {"weight_map": {k: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, k in enumerate(state)}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    no_tok = copy("no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (no_tok / name).unlink(missing_ok=True)
    (copy("bad-tokenizer") / "tokenizer.json").write_text("{not json")
    GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(root / "neox")
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("files")
    good = json.dumps({"text": "Question: what is 2 + 2? Answer: 4."})
    (root / "bad.jsonl").write_text(f"{good}\n{good}\n{{'text': 'single quotes'}}\n")
    (root / "list.jsonl").write_text(f'{good}\n["a", "list"]\n')
    (root / "nofield.jsonl").write_text('{"question": "1 + 1?"}\n')
    (root / "notes.csv").write_text("a,b\n1,2\n")
    (root / "half.txt").write_text("Title: X\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nThe book.\n")
    (root / "latin1.txt").write_bytes("caf\xe9 au lait\n\nencore un caf\xe9\n".encode("latin-1"))
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The tiny corpus, prepared once: no case needs to write to the cache."""
    path = tmp_path_factory.mktemp("bad_input_cache")
    build_corpus(config_from_dict(TINY, [f"data.cache_dir={path}"]).data, max_positions=64)
    return path


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def write_config(tmp_path: Path, cache: Path, case: Case) -> Path:
    data = json.loads(json.dumps(TINY))
    data["data"]["cache_dir"] = str(cache)
    data["output_dir"] = str(tmp_path / "runs")
    path = tmp_path / "tiny.yaml"
    if case.config_text is not None:
        path.write_bytes(case.config_text.encode("latin-1"))
    else:
        path.write_text(yaml.safe_dump(data) + case.extra_yaml)
    return path


# ----------------------------------------------------------------------------- the table


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_error_line_and_writes_nothing(
    case, tmp_path, capsys, monkeypatch, bases, files, cache
):
    from moe_emergence.training import trainer

    def no_training(*args, **kwargs):
        raise AssertionError("a training step was taken")

    monkeypatch.setattr(trainer.Trainer, "train_step", no_training)
    if case.disk_full:

        def disk_full(self, *args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(corpus_mod.Dataset, "save_to_disk", disk_full)
    path = write_config(tmp_path, cache, case)
    overrides = list(case.overrides)
    for name, folder in (("bases", bases), ("files", files), ("tmp", tmp_path)):
        overrides = [o.replace("{" + name + "}", str(folder)) for o in overrides]
    cache_before = listing(cache)

    rc, err = run_cli(capsys, "--config", path, *overrides)

    assert rc == 2, err
    assert_one_error_line(err, case.pattern)
    out = tmp_path / "runs"
    assert not out.exists()  # no run folder, no lock file, not even the output_dir the run created
    assert listing(cache) == cache_before
    assert not (tmp_path / "fresh-cache").exists()
