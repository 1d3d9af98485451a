#!/usr/bin/env bash
# Installs what lora-dist needs on a Debian/Ubuntu machine and builds it in release mode.
# Idempotent: when everything is present it only checks (a second or two) and lets SwiftPM's
# incremental build do nothing.
#   scripts/setup.sh            install missing packages, then `swift build -c release`
#   scripts/setup.sh --deps     install missing packages only
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(libopenmpi-dev openmpi-bin libopenblas-dev libdnnl-dev libzstd-dev libvips-dev pkg-config)
# The cluster tests' one-host Slurm (cluster/slurm/local-cluster.sh).
packages+=(slurm-wlm munge)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    sudo=""
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || { echo "setup: need root (or sudo) to apt-get install ${missing[*]}" >&2; exit 1; }
        sudo=sudo
    fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

command -v swift >/dev/null || { echo "setup: swift is not on PATH (Swift 6.x toolchain needed)" >&2; exit 1; }

if [ "${1:-}" != "--deps" ]; then
    swift build -c release
fi
