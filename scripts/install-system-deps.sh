#!/usr/bin/env bash
# Installs the Debian tools the tests use as independent oracles, when they are missing.
# Runs as root on CI and on the developers' machines; elsewhere it says what to install.
set -euo pipefail
need=()
command -v qemu-img >/dev/null 2>&1 || need+=(qemu-utils)
command -v smbd >/dev/null 2>&1 || need+=(samba)
command -v chromium >/dev/null 2>&1 || need+=(chromium)  # the dashboard's browser tests (Playwright drives it)
# Azurite (the Azure Blob emulator) from npm, pinned: 3.36+ needs Node >= 21. Installed into tools/.
if [ ! -x tools/node_modules/.bin/azurite-blob ]; then
  if command -v npm >/dev/null 2>&1; then
    npm install --silent --no-audit --no-fund --prefix tools azurite@3.35.0 >/dev/null
  else
    need+=(nodejs npm)
  fi
fi
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "install-system-deps: missing ${need[*]}; run: sudo apt-get install -y ${need[*]}" >&2
  [ "${CI:-}" = "true" ] && exit 1 || exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
if [ ! -x tools/node_modules/.bin/azurite-blob ]; then
  npm install --silent --no-audit --no-fund --prefix tools azurite@3.35.0 >/dev/null
fi
