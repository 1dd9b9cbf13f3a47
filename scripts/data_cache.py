#!/usr/bin/env python
"""The prepared-corpus cache: list it, or prune the entries not used lately.

    .venv/bin/python scripts/data_cache.py list [--cache-dir DIR]
    .venv/bin/python scripts/data_cache.py prune (--older-than DAYS | --keep N) [--dry-run] [--cache-dir DIR]

DIR defaults to data.cache_dir's default (~/.cache/moe_emergence/data). Only folders that are cache entries
(``moe_emergence.data.cache``) are ever removed; a run whose corpus is pruned prepares it again.
"""

from __future__ import annotations

import argparse
import sys
import time

from moe_emergence.console import ArgumentParser
from moe_emergence.data.cache import cache_entries, prune
from moe_emergence.data.config import DEFAULT_CACHE_DIR
from moe_emergence.errors import ConfigError, as_user_error, run_cli


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


def _main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("list", "prune"))
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    p.add_argument("--older-than", type=float, metavar="DAYS", help="prune: last used more than DAYS ago")
    p.add_argument("--keep", type=int, metavar="N", help="prune: all but the N most recently used")
    p.add_argument("--dry-run", action="store_true", help="prune: say what would go, remove nothing")
    args = p.parse_args(argv)
    if args.action == "list":
        entries = cache_entries(args.cache_dir)
        for e in entries:
            age = (time.time() - e.last_used) / 86400
            print(
                f"{e.path}  {_mb(e.size_bytes):>10}  last used {age:.1f} days ago  {e.domains} seq_len={e.seq_len}"
            )
        print(f"{len(entries)} entries, {_mb(sum(e.size_bytes for e in entries))} in {args.cache_dir}")
        return 0
    if args.older_than is None and args.keep is None:
        raise ConfigError("data_cache.py prune needs --older-than DAYS and/or --keep N")
    if (args.older_than is not None and args.older_than < 0) or (args.keep is not None and args.keep < 0):
        raise ConfigError("data_cache.py prune: --older-than and --keep must be >= 0")
    with as_user_error("data_cache.py prune", ValueError):
        gone = prune(args.cache_dir, args.older_than, args.keep, args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for e in gone:
        print(f"{verb} {e.path} ({_mb(e.size_bytes)})")
    print(f"{verb} {len(gone)} entries, {_mb(sum(e.size_bytes for e in gone))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
