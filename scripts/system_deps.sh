#!/usr/bin/env bash
# System packages the project needs beyond Python: make, and Chromium + ChromeDriver for browser tests.
set -euo pipefail
need=()
command -v make >/dev/null || need+=(make)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
