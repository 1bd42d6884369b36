#!/usr/bin/env bash
# Install Debian's chromium for the HTML report's browser test; CI machines start bare.
# Does nothing when /usr/bin/chromium is already there. Needs root (CI containers run as root).
set -euo pipefail
if [ ! -x /usr/bin/chromium ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
fi
/usr/bin/chromium --version
