#!/usr/bin/env bash
# Set up noclone in ./.venv: keeps an existing torch (GPU users install theirs first), else the 2.13.0 CPU wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${NOCLONE_TORCH:-torch==2.13.0}
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing $TORCH_SPEC" >&2
  .venv/bin/pip install -q "$TORCH_SPEC"
fi
# pin whatever torch is present so no dependency can swap it for another build
.venv/bin/python -c "import torch; print('torch==' + torch.__version__)" > .venv/torch-constraint.txt
.venv/bin/pip install -q -c .venv/torch-constraint.txt -e ".[test,faces,metrics,ray]" 2>&1 | grep -v "is ignored: it is neither" >&2 || true
.venv/bin/python -c "import noclone, diffusers, peft" || { echo "setup: noclone failed to install" >&2; exit 1; }
# the CLIP BPE vocabulary (only needed to rebuild tokenizers; open_clip's torchvision dependency is skipped)
.venv/bin/python -c "import open_clip" >/dev/null 2>&1 || .venv/bin/pip install -q --no-deps open_clip_torch 2>&1 | grep -v "is ignored" >&2 || true
echo "setup: ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))" >&2
