#!/usr/bin/env bash
# Sets up .venv (if needed) and runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
# DDS stays on loopback; test/conftest.py also gives each run its own domain and log folder.
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
# Three worker processes (pytest-xdist; each its own DDS domain, test/conftest.py): the tests
# mostly wait on the nodes and tools they start, so on 2 cores this takes 11 to 13 minutes, half
# the time of one process. `-n 0` runs them in this one process.
exec "$root/.venv/bin/python" -m pytest -q -n 3 "$@"
