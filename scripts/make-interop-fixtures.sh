#!/usr/bin/env bash
# Regenerate the SAE interop fixtures in tests/monitor/sae/fixtures/ with the REAL peer
# libraries (SAELens, EleutherAI sparsify), installed into a throwaway venv OUTSIDE the repo.
#
#   bash scripts/make-interop-fixtures.sh                 # venv at /tmp/lw-interop-venv
#   LW_INTEROP_VENV=/tmp/other bash scripts/make-interop-fixtures.sh
#   LW_INTEROP_OUT=/tmp/fx bash scripts/make-interop-fixtures.sh   # write somewhere else
#
# Env: LW_INTEROP_VENV  venv path (default /tmp/lw-interop-venv; must be outside the repo)
#      LW_INTEROP_OUT   fixture root (default tests/monitor/sae/fixtures)
#      PYTHON           interpreter used to create the venv (default python3; needs 3.11+)
#
# The peer libraries' dependency pins clash with latentwatch's, so they are never added to
# the project's install and this script never touches the project's .venv. Idempotent:
# an existing venv with the pinned versions is reused, and the script only rewrites the
# fixture sub-folders it owns (saelens/ sparsify/ gemma_scope/ bad/ manifest.json); the
# README.md beside them is hand-written. Reruns rewrite the same files byte for byte.
#
# torch: on this workplace `torch==2.13.0` resolves to the CPU wheel on local disk
# (2.13.0+cpu). Elsewhere the same spec pulls PyPI's default (CUDA) build, which also works,
# only bigger; the fixtures are computed on CPU either way.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LW_INTEROP_VENV:-/tmp/lw-interop-venv}"
OUT="${LW_INTEROP_OUT:-$ROOT/tests/monitor/sae/fixtures}"
PYTHON="${PYTHON:-python3}"

# Versions found to install and work together (Python 3.11.7). The first three are
# the point; the rest are pinned because they can change what the libraries compute or write.
PINS=(
  "torch==2.13.0"
  "sae-lens==6.54.12"
  "eai-sparsify==1.3.3"
  "transformer-lens==3.9.0"
  "transformers==5.24.0"
  "safetensors==0.8.0"
  "numpy==2.4.6"
  "simple-parsing==0.1.9"
)

source "$ROOT/scripts/throwaway-venv.sh"
throwaway_venv make-interop-fixtures "$VENV" "${PINS[@]}"

# Keep CPU use modest; these SAEs are tiny.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# SAELens save_inference_model orders cfg.json keys by iterating a set of field names; a fixed
# hash seed makes that order (and so the file) the same on every run.
export PYTHONHASHSEED=0
mkdir -p "$OUT"
cd "$ROOT"
"$VPY" scripts/interop_fixtures.py --out "$OUT"
