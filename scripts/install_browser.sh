#!/usr/bin/env bash
# Install headless Chromium and its WebDriver (Debian's chromium + chromium-driver) for the page's browser test.
# Idempotent: does nothing when both are present. Uses sudo only when not run as root.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && [ -x /usr/bin/chromedriver ]; then
  echo "install_browser: chromium and chromedriver already present" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "install_browser: not root and no sudo: install chromium chromium-driver by hand" >&2; exit 1; }
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null
command -v chromium >/dev/null 2>&1 && [ -x /usr/bin/chromedriver ] || { echo "install_browser: chromium or chromedriver missing after install" >&2; exit 1; }
echo "install_browser: $(chromium --version 2>/dev/null | head -1)" >&2
