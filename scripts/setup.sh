#!/usr/bin/env bash
# Creates the project's virtual environment in .venv/ (pinned requirements + this package, editable)
# and reuses it when it is already complete (scripts/check_venv.py says what that means); a venv
# missing something is completed, one of another Python or another checkout is made afresh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
# .venv may be a link to a folder elsewhere (another disk): Python's venv makes nothing through a
# link ("Unable to create directory"), so the set-up works in the folder it names.
if [ -L "$venv" ]; then
  venv="$(readlink -f "$venv")" || {
    echo "setup: $root/.venv is a link to $(readlink "$root/.venv"), which cannot be made" >&2
    exit 1
  }
fi
marker="$venv/.s4fusion-setup-complete"
pip_install=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# Ctrl-C: pip catches it and exits 1, and bash goes on after a command that did not die of the
# signal, so the torch step below took it for an unreachable index and fetched PyPI's CUDA build.
trap 'echo "setup: interrupted (the next run completes $venv)" >&2; exit 130' INT
# A pip step that failed (no network, a pin pip cannot find): pip said why above.
incomplete() {
  echo "setup: $1 failed (pip says why above; is PyPI out of reach?): $venv is left" \
       "incomplete, the next run completes it" >&2
  exit 1
}

# One set-up at a time (demo.sh and test.sh started together on a fresh machine): the second took
# the first's half-made venv for no venv at all, removed it under the first's pip and made its own.
exec 9<"$root/scripts/setup.sh"
if command -v flock >/dev/null && ! flock -n 9; then
  echo "setup: another set-up of $venv is running; waiting for it"
  flock 9
fi

# 3.11: the package needs it (enum.StrEnum), and the pinned NumPy (2.4) has no release for 3.10.
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "setup: Python 3.11 or newer is needed as python3 (found:" \
       "$(python3 --version 2>&1))" >&2
  exit 1
fi
python_version="$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
# From / and isolated: in the checkout, `import s4fusion_ros` finds the source whatever is installed.
venv_python() { (cd / && "$venv/bin/python" -I "$@"); }
# What the marker vouches for beyond check_venv.py: the package's set-up and installed files
# (ament links for launch/ and config/), this checkout and the Python that made the venv.
wanted="$( { cat "$root/requirements.txt" "$root/constraints.txt" "$root/setup.py"
             ls "$root/launch" "$root/config"
             echo "$root $python_version"; } | sha256sum | cut -d' ' -f1)"

if [ -e "$venv" ]; then
  problem="$(venv_python "$root/scripts/check_venv.py" "$root" "$venv" 2>&1)" && complete=true \
    || complete=false
  if $complete && [ -f "$marker" ] && [ "$(cat "$marker")" = "$wanted" ]; then
    echo "setup: reusing complete environment in $venv"
    echo "setup: ros2 launch / ros2 run find s4fusion_ros with AMENT_PREFIX_PATH=$venv"
    exit 0
  fi
  made_by="$(venv_python -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)"
  # Its interpreter links and its scripts name the Python and the folder it was made with.
  reason=""
  if [ ! -f "$venv/pyvenv.cfg" ]; then
    reason="it is not a virtual environment"
  elif [ "$made_by" != "$python_version" ]; then
    reason="its Python is ${made_by:-missing}, python3 is $python_version"
  else  # a script of it bound to another folder's Python, if any
    reason="$(python3 -I "$root/scripts/check_venv.py" --bound "$root" "$venv" || true)"
  fi
  if [ -n "$reason" ]; then
    echo "setup: making $venv afresh: $reason"
    rm -rf "$venv"
  else
    echo "setup: completing $venv (${problem:-its set-up files changed, or a set-up was interrupted})"
  fi
fi
if [ ! -e "$venv" ]; then
  echo "setup: creating $venv (pinned CPU torch, ROS 2 Kilted wheels; about 1.8 GB, a minute or two)"
fi
rm -f "$marker"
python3 -m venv "$venv"
# pip takes a pin installed with files missing as installed: those are reinstalled by force.
mapfile -t damaged < <(venv_python "$root/scripts/check_venv.py" --damaged "$root" "$venv")
torch_pin="$(grep '^torch==' "$root/requirements.txt")"
torch_force=() others=()
for pin in "${damaged[@]}"; do
  if [ "$pin" = "$torch_pin" ]; then torch_force=(--force-reinstall); else others+=("$pin"); fi
done
# torch from PyTorch's CPU index: PyPI's torch of the same version is the multi-GB CUDA build.
# A local wheel (pip's find-links) of that version serves as well where the index is unreachable;
# with neither, PyPI's build, said out loud, rather than no set-up at all.
if ! "${pip_install[@]}" -q --retries 1 --no-deps "${torch_force[@]}" \
    --index-url https://download.pytorch.org/whl/cpu "$torch_pin"; then
  echo "setup: PyTorch's CPU index is out of reach and pip has no local wheel of $torch_pin:" \
       "installing PyPI's, the CUDA build (several GB; it runs on the CPU too)" >&2
  "${pip_install[@]}" --no-deps "${torch_force[@]}" "$torch_pin" \
    || incomplete "installing PyPI's $torch_pin"
fi
if [ ${#others[@]} -gt 0 ]; then
  "${pip_install[@]}" --force-reinstall --no-deps "${others[@]}" \
    || incomplete "reinstalling ${others[*]}"
fi
# The pins, and what they pull in at the versions constraints.txt locks.
"${pip_install[@]}" -r "$root/requirements.txt" -c "$root/constraints.txt" \
  || incomplete "installing requirements.txt"
# No build isolation: the venv's setuptools (below 80 through colcon-core) builds it, not
# whatever PyPI has newest.
"${pip_install[@]}" --no-deps --no-build-isolation -e "$root" \
  || incomplete "installing this package (editable)"
# The venv as an ament prefix (index marker, share/s4fusion_ros, executables in lib/s4fusion_ros).
"$venv/bin/python" -m s4fusion_ros.ament_prefix "$venv"
if ! problem="$(venv_python "$root/scripts/check_venv.py" "$root" "$venv" 2>&1)"; then
  echo "setup: $venv is still incomplete: $problem" >&2
  exit 1
fi
# numba's CPU kernels compiled now, so the node's first start takes seconds, not half a minute.
"$venv/bin/python" -m s4fusion_ros.precompile
echo "$wanted" > "$marker"
echo "setup: done"
