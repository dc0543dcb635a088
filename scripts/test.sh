#!/usr/bin/env bash
# Sets up .venv (if needed) and runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
# DDS stays on loopback; test/conftest.py also gives each run its own domain and log folder.
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
exec "$root/.venv/bin/python" -m pytest -q "$@"
