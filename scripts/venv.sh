# Sourced by scripts/start.sh and scripts/test.sh (from the repository root): apt_install PACKAGE... and a
# project virtualenv in ./.venv with an up-to-date pip; sets PY to its python.

apt_install() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@"
}

if [ ! -x .venv/bin/python ]; then
  # Debian's system Python needs python3-venv for this; install it when it is missing.
  python3 -m venv .venv 2>/dev/null || { rm -rf .venv; apt_install python3-venv; python3 -m venv .venv; }
fi
PY=.venv/bin/python
$PY -m pip install -q --upgrade pip
