# Sourced by the fixture scripts: a venv OUTSIDE the repository holding exactly the given pins, so
# peer libraries whose pins clash with latentwatch's never touch the project's .venv.
#
#   source scripts/throwaway-venv.sh
#   throwaway_venv NAME VENV_PATH PIN...      # sets VPY to the venv's python
#
# The venv is reused when every pin is installed at its version; the first pin (torch) is
# installed on its own first, so the resolver starts from the CPU build on local disk.
# PYTHON (default python3, 3.11+) creates it. Refuses a path inside the repository.

throwaway_venv() {
  local name="$1" venv="$2" root
  shift 2
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  local abs
  abs="$(realpath -m "$venv")"
  case "$abs/" in
    "$root"/*) echo "$name: the venv ($abs) must be outside $root" >&2; exit 2 ;;
  esac
  VPY="$abs/bin/python"
  if [[ ! -x "$VPY" ]]; then
    echo "$name: creating $abs"
    mkdir -p "$(dirname "$abs")"
    "${PYTHON:-python3}" -m venv "$abs"
  fi
  if ! "$VPY" - "$@" <<'PY'
import importlib.metadata as md, sys
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        sys.exit(1)
    if have.split("+")[0] != want:
        sys.exit(1)
PY
  then
    echo "$name: installing $*"
    "$VPY" -m pip install --quiet "$1"
    "$VPY" -m pip install --quiet "$@"
  fi
}
