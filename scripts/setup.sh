#!/usr/bin/env bash
# Set up gvae-ns on a fresh Debian machine: system libraries, .venv with the pinned stack, the plugin itself.
# Idempotent: re-running only installs what is missing.  WITH_BROWSER=1 also installs Debian's chromium
# (for the viewer's browser test).  Override the interpreter with PYTHON=python3.11.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_pkgs=()
dpkg -s libusb-1.0-0 >/dev/null 2>&1 || apt_pkgs+=(libusb-1.0-0)          # open3d (ns-export) needs it
command -v g++ >/dev/null 2>&1 || apt_pkgs+=(g++)                          # builds the compiled CPU rasterizer
if [ "${WITH_BROWSER:-0}" = 1 ] && ! command -v chromium >/dev/null 2>&1; then apt_pkgs+=(chromium); fi
if [ ${#apt_pkgs[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${apt_pkgs[@]}" >/dev/null
fi

PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import nerfstudio, gsplat, viser, pytest" >/dev/null 2>&1; then
  .venv/bin/pip install -q --upgrade pip setuptools wheel
  .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1 nerfstudio==1.1.5 gsplat==1.4.0 viser==0.2.7 pytest
fi
.venv/bin/pip install -q --no-build-isolation -e ".[test]"   # dependencies resolved, so pyproject's list is exercised
echo "gvae-ns is set up in $(pwd)/.venv"
