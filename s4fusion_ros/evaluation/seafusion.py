"""SeAFusion's fusion network (Tang, Yuan and Ma, Information Fusion 82, 2022), for comparison.

Re-implemented from the paper and the published network so that the authors' state dict
(``SeAFusion.pth``, MIT, Linfeng Tang) loads strictly. Per modality (VI and IR luminance):

    conv 3x3 1->16 + LeakyReLU(0.2), then RGBD 16->32 and RGBD 32->48, where
    RGBD(x) = LeakyReLU_0.1(conv1x1(dense(x)) + conv1x1(|Sx * x| + |Sy * x|)),
    dense(x) = [x, c1, c2], c1 = lrelu(conv3x3(x)), c2 = lrelu(conv3x3([x, c1])),
    Sx, Sy depthwise 3x3 kernels (Sobel at initialisation; the published ones were trained).

Decoder on concat(VI, IR), 96 channels: 3x3 convs 96->64->32->16 with LeakyReLU(0.2), then
16->1 and tanh(x) / 2 + 0.5, so the output lies in (0, 1).

The published decoder layers carry BatchNorm parameters that its forward pass never applies
(their running statistics are still the initial 0 / 1); they are kept here as ``bn`` only so that
the state dict loads strictly, and are not applied either.

The authors' test script (Linfeng-Tang/SeAFusion ``test.py``) fuses the float luminance of the
visible RGB image, joins the fused luminance with the visible image's chrominance, converts that
to RGB, clamps it to [0, 1], min-max stretches it over all three channels and truncates
``255 * x`` to uint8. `published_image` does those steps, to reproduce their images (and their
TNO metric values, to 2e-5). Their YCrCb is OpenCV's (same coefficients, chroma offset 0.5).
"""

import pathlib

import cv2
import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from ..imaging.color import unit_gray_pair
from ..imaging.filters import SOBEL_X

_SOBEL = torch.tensor(SOBEL_X, dtype=torch.float32)  # the signs do not matter: |Sx * x|


def _lrelu(x):
    return F.leaky_relu(x, negative_slope=0.2)


class ConvAct(nn.Module):
    """Conv2d ('same' zero padding) then ``act``; ``with_bn`` adds an unapplied BatchNorm."""

    def __init__(self, cin, cout, kernel_size=3, act=_lrelu, with_bn=False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2)
        self.act = act
        if with_bn:
            self.bn = nn.BatchNorm2d(cout)  # in the published weights only, see module docstring

    def forward(self, x):
        """(B, cin, H, W) -> (B, cout, H, W)."""
        y = self.conv(x)
        return y if self.act is None else self.act(y)


class DenseBlock(nn.Module):
    """Two densely connected 3x3 convolutions: C channels in, 3C out."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = ConvAct(channels, channels)
        self.conv2 = ConvAct(2 * channels, channels)

    def forward(self, x):
        """(B, C, H, W) -> (B, 3C, H, W)."""
        x = torch.cat((x, self.conv1(x)), dim=1)
        return torch.cat((x, self.conv2(x)), dim=1)


class GradientMagnitude(nn.Module):
    """|Sx * x| + |Sy * x| per channel, with depthwise kernels (Sobel at initialisation)."""

    def __init__(self, channels):
        super().__init__()
        self.convx = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.convy = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        with torch.no_grad():
            self.convx.weight.copy_(_SOBEL.expand_as(self.convx.weight))
            self.convy.weight.copy_(_SOBEL.T.expand_as(self.convy.weight))

    def forward(self, x):
        """(B, C, H, W) -> (B, C, H, W)."""
        return self.convx(x).abs() + self.convy(x).abs()


class RGBD(nn.Module):
    """Residual gradient dense block: dense features plus a gradient branch, 1x1-projected."""

    def __init__(self, cin, cout):
        super().__init__()
        self.dense = DenseBlock(cin)
        self.convdown = ConvAct(3 * cin, cout, kernel_size=1, act=None)
        self.sobelconv = GradientMagnitude(cin)
        self.convup = ConvAct(cin, cout, kernel_size=1, act=None)

    def forward(self, x):
        """(B, cin, H, W) -> (B, cout, H, W)."""
        y = self.convdown(self.dense(x)) + self.convup(self.sobelconv(x))
        return F.leaky_relu(y, negative_slope=0.1)


def _tanh_unit(x):
    return torch.tanh(x) / 2 + 0.5


class SeAFusion(nn.Module):
    """SeAFusion fusion network: ``forward(ir, vi)`` on (B, 1, H, W) luminance in [0, 1]."""

    def __init__(self, channels=(16, 32, 48)):
        super().__init__()
        c0, c1, c2 = channels
        for side in ('vis', 'inf'):
            setattr(self, f'{side}_conv', ConvAct(1, c0))
            setattr(self, f'{side}_rgbd1', RGBD(c0, c1))
            setattr(self, f'{side}_rgbd2', RGBD(c1, c2))
        self.decode4 = ConvAct(2 * c2, 2 * c1, with_bn=True)
        self.decode3 = ConvAct(2 * c1, 2 * c0, with_bn=True)
        self.decode2 = ConvAct(2 * c0, c0, with_bn=True)
        self.decode1 = ConvAct(c0, 1, act=_tanh_unit, with_bn=True)

    @classmethod
    def from_published(cls, path, device='cpu'):
        """Load the authors' ``SeAFusion.pth`` (legacy torch.save format) strictly, in eval mode.

        ``weights_only=True`` restricts unpickling to tensors and plain containers, which the
        legacy format supports too, so no arbitrary object is ever unpickled.
        """
        state = torch.load(pathlib.Path(path), map_location=device, weights_only=True)
        model = cls()
        model.load_state_dict(state, strict=True)
        return model.to(device).eval()

    def forward(self, ir, vi):
        """IR and VI luminance (B, 1, H, W) in [0, 1] -> fused luminance (B, 1, H, W) in (0, 1)."""
        v = self.vis_rgbd2(self.vis_rgbd1(self.vis_conv(vi)))
        i = self.inf_rgbd2(self.inf_rgbd1(self.inf_conv(ir)))
        x = torch.cat((v, i), dim=1)  # VI first, as the published decoder weights expect
        return self.decode1(self.decode2(self.decode3(self.decode4(x))))

    @torch.inference_mode()
    def fuse(self, ir, vi):
        """Fuse gray (H, W) IR and VI (uint8, or float in [0, 1]) -> float32 (H, W) in [0, 1]."""
        device = next(self.parameters()).device
        ir, vi = (torch.from_numpy(image)[None, None].to(device)  # (1, 1, H, W)
                  for image in unit_gray_pair(ir, vi))
        out = self(ir, vi)
        return out[0, 0].clamp(0.0, 1.0).cpu().numpy()


def published_image(fused_y, visible_crcb=None):
    """The image the authors' test script saves for a fused luminance in [0, 1].

    ``visible_crcb``: the visible image's float (Cr, Cb) in [0, 1], or None for a gray visible
    image (their RGB then has three equal channels). Returns uint8 (H, W) for gray, else
    (H, W, 3) BGR. Their script stretches over its batch of images; here each image is its own
    batch. On MSRS each image's clamped RGB spans 0-1 already, so the stretch changes nothing
    there; sets of images of different sizes (RoadScene, TNO) cannot be batched at all.
    """
    fused_y = np.asarray(fused_y, dtype=np.float32)
    if visible_crcb is None:
        composed = fused_y
    else:
        cr, cb = (np.asarray(c, dtype=np.float32) for c in visible_crcb)
        composed = cv2.cvtColor(cv2.merge([fused_y, cr, cb]), cv2.COLOR_YCrCb2BGR)
    return _stretch_to_uint8(np.clip(composed, 0.0, 1.0))


def _stretch_to_uint8(values):
    """Min-max stretch ``values`` (any shape) to [0, 1], then truncate ``255 * x`` to uint8."""
    values = np.asarray(values, dtype=np.float32)
    lo, hi = values.min(), values.max()
    stretched = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    return (255.0 * stretched).astype(np.uint8)
