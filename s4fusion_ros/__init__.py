"""s4fusion_ros: thermal/RGB fusion with S4Fusion, a ROS-free core and a thin ROS 2 layer."""

__version__ = '0.1.0'
