#!/usr/bin/env bash
# Install what fleet, its lab and its tests need on a Debian or Ubuntu machine (as root):
# system packages with apt-get, the Python package into .venv. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# nix-setup-systemd makes the nixbld build users; it is only a Recommends of nix-bin.
packages=(nix-bin nix-setup-systemd systemd-container debootstrap debian-archive-keyring iproute2 util-linux
          openssh-client curl python3 python3-venv haproxy)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # HAProxy is here for `haproxy -c` of the generated configurations (the lab's balancers
  # run their own); Debian starts its own on install.
  if [[ " ${missing[*]} " == *" haproxy "* ]]; then
    systemctl disable --now haproxy.service >/dev/null 2>&1 || true
  fi
fi

python=python3
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "fleet needs Python 3.11 or newer; $python is $("$python" --version)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
