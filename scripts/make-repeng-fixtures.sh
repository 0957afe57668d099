#!/usr/bin/env bash
# Regenerate the repeng control-vector fixture in tests/probes/fixtures/repeng/ with the REAL repeng
# library, installed into a throwaway venv OUTSIDE the repo, and prove latentwatch's GGUF export
# against it:
#
#   1. repeng trains a control vector on the tiny random llama of tests/tiny.py and saves it with
#      its own ControlVector.export_gguf (tiny_llama.gguf), recording its directions and what its
#      ControlModel does to the logits (tiny_llama.json);
#   2. latentwatch (the project's .venv) imports that file and exports it again;
#   3. repeng's own ControlVector.import_gguf reads latentwatch's export; the script fails unless it
#      equals the fixture value for value and byte for byte, and records that in tiny_llama.json.
#
#   bash scripts/make-repeng-fixtures.sh                  # venv at /tmp/lw-repeng-venv
#   LW_REPENG_VENV=/tmp/other bash scripts/make-repeng-fixtures.sh
#   LW_REPENG_OUT=/tmp/fx bash scripts/make-repeng-fixtures.sh    # write somewhere else
#
# Env: LW_REPENG_VENV  venv path (default /tmp/lw-repeng-venv; must be outside the repo)
#      LW_REPENG_OUT   fixture folder (default tests/probes/fixtures/repeng)
#      LW_CLI          latentwatch's command (default .venv/bin/latentwatch)
#      PYTHON          interpreter used to create the venv (default python3; needs 3.11+)
#
# llama.cpp's own loader is not run: llama-cpp-python has no wheel on the registry (it compiles
# llama.cpp from source) and binds only llama.h, not common's control-vector GGUF loader
# (common_control_vector_load). tests/probes/test_vectors.py checks the export against that
# loader's rules instead (see the docstring of probes/vectors.py).
#
# torch: on this workplace `torch==2.13.0` resolves to the CPU wheel on local disk (2.13.0+cpu).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LW_REPENG_VENV:-/tmp/lw-repeng-venv}"
OUT="${LW_REPENG_OUT:-$ROOT/tests/probes/fixtures/repeng}"
LW_CLI="${LW_CLI:-$ROOT/.venv/bin/latentwatch}"
PYTHON="${PYTHON:-python3}"

# Versions found to install and work together (Python 3.11.7). repeng is the point; torch,
# transformers, gguf, numpy and scikit-learn (its PCA) can change what it computes or writes, and
# must match latentwatch's torch / transformers so both build the same tiny model.
PINS=(
  "torch==2.13.0"
  "repeng==0.4.0"
  "transformers==5.24.0"
  "gguf==0.19.0"
  "numpy==1.26.4"
  "scikit-learn==1.9.1"
  "tokenizers==0.23.3"
)

source "$ROOT/scripts/throwaway-venv.sh"
throwaway_venv make-repeng-fixtures "$VENV" "${PINS[@]}"

export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cd "$ROOT"
"$VPY" scripts/repeng_fixtures.py write --out "$OUT"
"$LW_CLI" steer import "$OUT/tiny_llama.gguf" --out "$WORK/pack" --id tiny-llama-repeng
"$LW_CLI" steer export "$WORK/pack" --out "$WORK/ours.gguf"
"$VPY" scripts/repeng_fixtures.py check --ours "$WORK/ours.gguf" --out "$OUT"
