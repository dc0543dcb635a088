"""Sobel kernels and SSIM, shared by the metrics, the training loss and SeAFusion (no torch).

`ssim_map` is plain arithmetic, so it works on NumPy arrays and torch tensors alike; the caller
passes the windowed mean of its own framework.
"""

import cv2
import numpy as np

# MATLAB's fspecial('sobel') is SOBEL_Y (d/dy with the first row positive); SOBEL_X is d/dx.
SOBEL_X = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
SOBEL_Y = np.array([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]])
SSIM_WINDOW_SIZE = 11
SSIM_SIGMA = 1.5


def ssim_window() -> np.ndarray:
    """Return SSIM's 1-D Gaussian window (Wang et al. 2004) as float64 (11, 1), summing to 1."""
    return cv2.getGaussianKernel(SSIM_WINDOW_SIZE, SSIM_SIGMA, cv2.CV_64F)


def ssim_map(x, y, windowed_mean, data_range: float):
    """SSIM of x and y at each window position; windowed_mean(a) averages a under the window."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = windowed_mean(x), windowed_mean(y)
    var_x = windowed_mean(x * x) - mu_x * mu_x
    var_y = windowed_mean(y * y) - mu_y * mu_y
    cov = windowed_mean(x * y) - mu_x * mu_y
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)
            / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)))
