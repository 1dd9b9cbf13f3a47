"""Upcycle a dense GPT-2 checkpoint into an MoE model without training, and save it.

    python scripts/upcycle.py SOURCE OUT [key=value ...]

SOURCE is a hub id or a local GPT-2 folder; the overrides set ``MoEConfig`` fields, e.g.
``num_experts=8 top_k=1 layers=[8,9,10,11] init=noise``. OUT (new or empty) gets ``save_pretrained``
files (and the source's tokenizer when it has one), loadable with ``AutoModelForCausalLM`` after
``import moe_emergence``; they are written to a new hidden folder beside OUT (``.OUT.*.tmp``, removed if the save
fails, or when Ctrl-C or SIGTERM stops the run once it has started: exit status 130 or 143) and renamed in one
step, so OUT is whole or absent; nothing already there is touched. User mistakes print one ``error:`` line and
exit with status 2.
"""

import contextlib
import os
import shutil
import sys
from pathlib import Path

from moe_emergence import MoEConfig, upcycle
from moe_emergence.config_loader import load
from moe_emergence.console import ArgumentParser, quiet_libraries, stopped_by, stops_as_interrupt
from moe_emergence.errors import ConfigError, as_user_error, run_cli

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


def _main(argv, stops) -> int:
    quiet_libraries()
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", help="hub id or local GPT-2 checkpoint folder")
    p.add_argument("out", help="output folder (new or empty)")
    p.add_argument("overrides", nargs="*", help="MoEConfig fields as key=value")
    args = p.parse_args(argv)
    out = Path(args.out)
    cfg = load(MoEConfig, overrides=args.overrides)
    made = [d for d in out.parents if not d.exists()]  # the parent folders this run creates (deepest first)
    tmp = None
    try:
        with stops.held():  # a stop waits until the clean-up below knows the staging folder
            tmp = _staging_folder(out)  # before the work: a bad OUT is one error line
        model, tokenizer = _build(args.source, cfg)
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with as_user_error(f"output {str(out)!r}"):
            tmp.rename(out)  # one step: replaces an empty OUT folder (POSIX rename), never a non-empty one
    finally:
        with stops.held():  # a Ctrl-C or SIGTERM (a second one) does not cut the clean-up short
            _clean_up(tmp, made)
    E, layers = cfg.num_experts, model.config.moe_layers
    print(
        f"upcycled {args.source} -> {out}: {E} experts (top-{cfg.top_k}, init={cfg.init}) in blocks {layers}"
    )
    return 0


def _clean_up(tmp: Path | None, made: list[Path]) -> None:
    """After a failed or stopped run (``tmp``, the staging folder, still there or never made): remove it and the
    parent folders of OUT this run made, unless someone else's files are in them since. Nothing after success."""
    if tmp is not None and not tmp.exists():
        return  # renamed to OUT
    if tmp is not None:
        shutil.rmtree(tmp)
    for d in made:
        with contextlib.suppress(OSError):  # not empty (someone else's files) or already gone: it stays
            d.rmdir()


def _staging_folder(out: Path) -> Path:
    """A new hidden folder beside ``out`` (ours alone) to save into, renamed to ``out`` at the end, with the
    permissions of a folder made by ``mkdir`` (umask); ``ConfigError`` where ``out`` is not a new or empty folder
    or its place cannot take one."""
    if out.name in ("", "..") or out.resolve() == Path.cwd():  # not a name a folder can be renamed to
        raise ConfigError(f"output {str(out)!r}: name a new or empty folder, e.g. out/gpt2-moe")
    with as_user_error(f"output {str(out)!r}"):  # a name too long for the file system, no access, ...
        if out.is_symlink() or out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError(f"output {str(out)!r} exists and is not an empty folder; choose a new one")
    tmp = out.with_name(f".{out.name[:200]}.{os.getpid()}.tmp")
    with as_user_error(f"output {str(out)!r}"):
        out.parent.mkdir(parents=True, exist_ok=True)
        # a name the file system refuses (too long: ENAMETOOLONG) is refused now, not after the work
        with contextlib.suppress(FileNotFoundError):
            os.lstat(out)
        tmp.mkdir()  # new (FileExistsError otherwise), with mkdir's permissions (mkdtemp's are 0700)
    return tmp


def _build(source: str, cfg: MoEConfig):
    """The upcycled model of ``source`` and its tokenizer (None when a local folder has no tokenizer files)."""
    with as_user_error(f"source {source!r}"):
        model = upcycle(source, cfg)
    src = Path(source)
    if src.is_dir() and not any((src / f).exists() for f in TOKENIZER_FILES):
        print(f"note: {src} has no tokenizer files; saved the model only")
        return model, None
    from transformers import AutoTokenizer

    with as_user_error(f"source {source!r}: cannot load its tokenizer"):
        return model, AutoTokenizer.from_pretrained(source)


def main(argv=None) -> int:
    try:
        with stops_as_interrupt() as stops:  # a stopped run removes its staging folder too
            return run_cli(lambda a: _main(a, stops), argv)
    except KeyboardInterrupt as e:
        return stopped_by("upcycle.py", e, "OUT is whole or absent, no staging folder is left")


if __name__ == "__main__":
    sys.exit(main())
