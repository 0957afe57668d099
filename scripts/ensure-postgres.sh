#!/usr/bin/env sh
# Make sure the PostgreSQL server binaries (initdb, pg_ctl) are installed: the storage tests
# start a throw-away server with them (tests/pg.py). No cluster is used or started here.
set -eu

have_pg() {
    for f in /usr/lib/postgresql/*/bin/initdb; do
        [ -x "$f" ] && return 0
    done
    command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1
}

if have_pg; then
    echo "postgresql: server binaries present"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "postgresql: server binaries missing; install PostgreSQL (initdb, pg_ctl) with your" \
         "package manager (e.g. 'brew install postgresql', 'dnf install postgresql-server')" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends postgresql
have_pg
echo "postgresql: installed"
