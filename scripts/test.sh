#!/usr/bin/env bash
# Install everything, then run the whole check: lint, types and the test suite
# (lab tests boot real containers, so run it as root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The HTML report is checked in a real browser.
if ! command -v chromium >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
export PATH="$PWD/.venv/bin:$PATH"

ruff check fleet tests bench
ruff format --check fleet tests bench
mypy
status=0
python -m pytest -q -rs "$@" || status=$?
# pytest's 5 means it collected no test: that is a failure of this script too.
exit "$status"
