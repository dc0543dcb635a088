#!/usr/bin/env bash
# Sets up .venv (if needed) and runs the main job: the shipped sample bag played into the live node,
# the fused output recorded to demo_output/. Extra arguments go to s4fusion-demo.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
# DDS stays on this machine.
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
exec "$root/.venv/bin/s4fusion-demo" "$@"
