"""s4fusion_ros: thermal/RGB fusion with S4Fusion, a ROS-free core and a thin ROS 2 layer."""

import os

# On a robot other processes share the CPU. OpenMP threads that spin while waiting (the default)
# then make each of the model's many small parallel regions wait for a descheduled thread: compact
# at 640x480 went from 0.45 s to 1.5-3.2 s with 2 threads and a busy core, 0.53 s when passive.
# This must be set before torch loads OpenMP; a value the user set is kept.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

__version__ = '0.1.0'
