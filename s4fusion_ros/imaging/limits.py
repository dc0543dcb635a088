"""Largest image the package decodes, and OpenCV's refusal of a larger one (no imports, so entry
points read it before OpenCV loads)."""

# Larger than any camera, small enough that a copy cannot exhaust memory.
MAX_SIDE = 1 << 15
MAX_PIXELS = 1 << 28


def over_opencv_limits(error) -> bool:
    """Whether a cv2.error from decoding is OpenCV refusing an image larger than the limits
    the entry points give it (OPENCV_IO_MAX_IMAGE_*), rather than a fault in its data."""
    return 'CV_IO_MAX_IMAGE' in error.err
