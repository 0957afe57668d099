#!/usr/bin/env bash
# Fail (non-zero) when the checked-in generated code under latentwatch/ drifts
# from proto/, or when the proto fails `buf lint` / `buf format`.
#
# latentwatch/ holds generated code only: any file there that gen-proto.sh
# does not produce counts as drift too.
# buf comes from $BUF, else node_modules/.bin/buf (`npm ci`), else PATH.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

BUF="${BUF:-}"
if [[ -z "$BUF" ]]; then
  if [[ -x node_modules/.bin/buf ]]; then BUF=node_modules/.bin/buf
  elif command -v buf >/dev/null 2>&1; then BUF=buf
  else
    echo "check-proto: buf not found; run \`make install\` (it runs \`npm ci\`)" >&2
    exit 2
  fi
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

status=0
scripts/gen-proto.sh "$TMP"
if ! diff -r -u -x __pycache__ "$TMP/latentwatch" latentwatch; then
  echo "check-proto: generated code is stale; run scripts/gen-proto.sh and commit" >&2
  status=1
fi
if ! "$BUF" lint proto; then
  echo "check-proto: buf lint failed" >&2
  status=1
fi
if ! "$BUF" format --diff --exit-code proto; then
  echo "check-proto: proto is not buf-formatted; run \`$BUF format -w proto\`" >&2
  status=1
fi
[[ $status -eq 0 ]] && echo "check-proto: OK"
exit $status
