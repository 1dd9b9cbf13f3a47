#!/usr/bin/env bash
# One-shot set-up on a fresh machine: a virtualenv in .venv with the package (editable) and dev tools.
# Without an NVIDIA GPU the CPU build of torch goes in first, so that the plain `torch` requirement
# does not pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || "${PYTHON:-python3}" -m venv .venv
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null && ! command -v nvidia-smi >/dev/null 2>&1; then
  # Our CPU machines serve this CPU build from a local wheel folder; elsewhere set
  # TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to get a CPU build.
  pip install -q "torch==${TORCH_CPU_VERSION:-2.13.0}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
# The package is installed in editable mode, so code changes need no reinstall: only a changed
# pyproject.toml (dependencies) does. A stamp named after its hash skips the ~15 s pip run otherwise.
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  pip install -q -e ".[dev,dashboard]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
python -c "import moe_emergence, torch, transformers; print('moe_emergence', moe_emergence.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
