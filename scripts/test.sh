#!/usr/bin/env bash
# The test suite: lint and format check, then pytest. CPU only; Triton kernels run under
# TRITON_INTERPRET=1 inside their own tests.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
ruff check .
ruff format --check .
python -m pytest -q -p no:cacheprovider --timeout=900 tests "$@"
