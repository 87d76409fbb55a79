#!/usr/bin/env bash
# Install everything, bring up a lab of local hosts and show it. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
# The lab builds everything itself; do not wait on binary caches.
export NIX_CONFIG="substituters ="

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

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

step "done: the lab stays up; tear it down with: fleet lab down"
