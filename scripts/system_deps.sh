#!/usr/bin/env bash
# System packages the project needs beyond Python: make, Chromium + ChromeDriver for browser tests, and
# openssh-server + rsync for `ray up` (cluster.yaml drives the nodes over ssh; tests/test_cluster.py runs a
# private sshd on 127.0.0.1). Idempotent: installs only what is missing.
set -euo pipefail
need=()
command -v make >/dev/null || need+=(make)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
# sshd lives in /usr/sbin, which is not on every PATH.
command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null || need+=(openssh-client)
command -v rsync >/dev/null || need+=(rsync)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
