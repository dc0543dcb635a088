"""Largest image the package decodes (no imports, so entry points read it before OpenCV loads)."""

# Larger than any camera, small enough that a copy cannot exhaust memory.
MAX_SIDE = 1 << 15
MAX_PIXELS = 1 << 28
