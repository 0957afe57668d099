#!/usr/bin/env bash
# Regenerate the Python gRPC code for proto/latentwatch/v1/*.proto into
# latentwatch/v1/ (monitor_pb2.py, monitor_pb2_grpc.py, monitor_pb2.pyi).
#
#   scripts/gen-proto.sh            # write into the repository
#   scripts/gen-proto.sh OUT_DIR    # write into OUT_DIR (used by check-proto.sh)
#
# Output depends only on the proto files and the grpcio-tools version, so it
# is reproducible; scripts/check-proto.sh fails when the checked-in code drifts.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT}"
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

mkdir -p "$OUT"
cd "$ROOT"
# Sorted, repository-relative paths: stable across machines and runs.
mapfile -t PROTOS < <(cd proto && find latentwatch -name '*.proto' | LC_ALL=C sort)
[[ ${#PROTOS[@]} -gt 0 ]] || { echo "gen-proto: no .proto files under proto/" >&2; exit 1; }

# -Iproto makes the generated grpc module import `from latentwatch.v1 import
# monitor_pb2`; grpc_tools.protoc adds the well-known types (Timestamp) itself.
(cd proto && "$PYTHON" -m grpc_tools.protoc -I. \
  --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
  "${PROTOS[@]}")

# Package markers (protoc does not write them).
for d in latentwatch latentwatch/v1; do
  mkdir -p "$OUT/$d"
  [[ -f "$OUT/$d/__init__.py" ]] || : > "$OUT/$d/__init__.py"
done
