#!/usr/bin/env bash
# Install everything, bring up a lab of local hosts and show it. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
# The lab builds everything itself; do not wait on binary caches.
export NIX_CONFIG="substituters ="

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

fleet lab down >/dev/null 2>&1 || true  # the demo makes its lab anew
step "fleet lab up --hosts 4: four Debian hosts with systemd, sshd and Nix"
fleet lab up --hosts 4
flake=$(fleet lab flake)

step "every host runs generation 1 of its system; its service answers"
for address in $(fleet --json lab status | python3 -c 'import json,sys; [print(h["address"]) for h in json.load(sys.stdin)]'); do
  printf '%s  version=%s  health=%s\n' "$address" \
    "$(curl -s -m 2 "http://$address:8080/version")" "$(curl -s -m 2 "http://$address:8080/health")"
done

step "the inventory the fleet tool reads (nix eval $flake#fleet), first host"
nix --extra-experimental-features 'nix-command flakes' eval --json "$flake#fleet.hosts.lab1" | python3 -m json.tool

step "release 1: fleet deploy (canary first, then the rest)"
fleet lab release --version 1
fleet --flake "$flake" deploy

step "release 2"
fleet lab release --version 2
fleet --flake "$flake" deploy

step "release 3 is broken: its service starts but fails its health check"
fleet lab release --version 3 --broken health
code=0
fleet --flake "$flake" deploy --health-timeout 5 || code=$?
echo "fleet deploy exited $code (3: the change failed and every touched host is back on its known-good generation)"
[ "$code" -eq 3 ]

step "fleet status: every host is back on release 2, healthy, nothing locked"
fleet --flake "$flake" status

step "done: the lab stays up; tear it down with: fleet lab down"
