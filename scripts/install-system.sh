#!/usr/bin/env bash
# System packages the test suite runs for real: PostgreSQL, Prometheus (promtool), Chromium,
# Node.js (buf). Installs only what is missing, so a second `make install` costs nothing.
set -euo pipefail
need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v promtool >/dev/null || need+=(prometheus)
command -v chromium >/dev/null || need+=(chromium)
command -v npm >/dev/null || need+=(nodejs npm)
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "installing system packages: ${need[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian starts the packaged servers; the tests start their own on loopback.
$SUDO systemctl disable --now postgresql prometheus >/dev/null 2>&1 || true
