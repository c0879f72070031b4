#!/usr/bin/env bash
# Prints the path of a headless-capable Chromium, installing Debian's `chromium` when it is
# missing (needs root; the tests run as root in CI). Exit 3 when it is missing and cannot be
# installed.
set -euo pipefail
for name in chromium chromium-browser google-chrome; do
  if command -v "$name" >/dev/null; then
    command -v "$name"
    exit 0
  fi
done
if [ "$(id -u)" != 0 ]; then
  echo "chromium: not installed, and installing it needs root" >&2
  exit 3
fi
echo "chromium: installing Debian's chromium" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
command -v chromium
