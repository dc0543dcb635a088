"""ROS-free image handling: message decoding, thermal normalization, registration and colour."""
