"""Fusion evaluation, ROS-free: quality metrics, classical baselines, the SeAFusion peer, flicker
on video and the quality report.

Import the submodules directly (`metrics`, `baselines`, `seafusion`, `temporal`, `report`);
`baselines`, `seafusion` and `temporal` (through the engine) need torch.
"""
