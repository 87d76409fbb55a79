#!/usr/bin/env bash
# Install what fleet, its lab and its tests need on a Debian or Ubuntu machine (as root):
# system packages with apt-get, the Python package into .venv. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# nix-setup-systemd makes the nixbld build users; it is only a Recommends of nix-bin.
packages=(nix-bin nix-setup-systemd systemd-container debootstrap debian-archive-keyring iproute2 util-linux
          openssh-client curl python3 python3-venv haproxy
          prometheus prometheus-alertmanager prometheus-blackbox-exporter prometheus-node-exporter)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # HAProxy and Prometheus's programs are here for their own checkers of the generated
  # configurations (haproxy -c, promtool, amtool, the blackbox exporter's --config.check)
  # and the tests that run them; the lab's hosts run their own. Debian starts each as a
  # service on install.
  for service in haproxy prometheus prometheus-alertmanager prometheus-blackbox-exporter \
                 prometheus-node-exporter; do
    if [[ " ${missing[*]} " == *" $service "* ]]; then
      systemctl disable --now "$service.service" >/dev/null 2>&1 || true
    fi
  done
fi

python=python3
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "fleet needs Python 3.11 or newer; $python is $("$python" --version)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
