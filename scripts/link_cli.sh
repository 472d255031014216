#!/usr/bin/env bash
# Put the `dicomnode` command of a virtualenv on the PATH: a symbolic link in ~/.local/bin, the per-user
# folder that Debian's and Ubuntu's login shells put on the PATH (once it exists: a new shell picks it up).
# Usage: bash scripts/link_cli.sh PATH/TO/.venv/bin/dicomnode
set -euo pipefail
target="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
[ -x "$target" ] || { echo "link_cli: $target is not an executable" >&2; exit 1; }
mkdir -p "$HOME/.local/bin"
ln -sfn "$target" "$HOME/.local/bin/dicomnode"
case ":$PATH:" in
  *":$HOME/.local/bin:"*) echo "dicomnode is on your PATH ($HOME/.local/bin/dicomnode -> $target)" ;;
  *) echo "dicomnode: linked as $HOME/.local/bin/dicomnode; that folder is not on this shell's PATH yet:" \
          "open a new login shell, or run it as $target" ;;
esac
