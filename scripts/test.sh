#!/usr/bin/env bash
# The test suite: lint and format check, then pytest. CPU only; Triton kernels run under
# TRITON_INTERPRET=1 inside their own tests. Two pytest workers (pytest-xdist), each taking whole test files
# (a file's module fixtures, e.g. the interpreted kernels' runs, are built once): on the 2-core CI machine the
# suite takes ~10 minutes against ~15.5 in one process (2026-12-03). Extra arguments go to pytest (``-n 0``: one
# process, e.g. for --pdb).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
ruff check .
ruff format --check .
python -m pytest -q -p no:cacheprovider --timeout=900 -n 2 --dist loadfile tests "$@"
