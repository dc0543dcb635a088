"""Fusion evaluation, ROS-free: quality metrics, classical baselines and the SeAFusion peer.

Import the submodules directly (`metrics`, `baselines`, `seafusion`); `baselines` and `seafusion`
need torch.
"""
