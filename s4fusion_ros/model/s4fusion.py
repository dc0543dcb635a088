"""The S4Fusion network (arXiv 2405.20881, IEEE TIP 2025) and its configuration presets."""

from dataclasses import asdict, dataclass, fields, replace
import math

import torch
from torch import nn
import torch.nn.functional as F

from .blocks import PatchEmbed, SS2D, VSSLayer
from .fusion import CMSALayer
from .pyramid import laplacian_fuse
from .scan import BACKENDS

BASES = ('none', 'laplacian')
# Config fields that enhance the Laplacian base; 1.0 (plain) without it.
BASE_ENHANCEMENTS = ('detail_gain', 'base_contrast')
# Inner width over model width of the selective-scan blocks: the authors use 1.5; far beyond it a
# corrupt config would allocate without bound.
MAX_SSM_RATIO = 16.0


def _is_integer(value) -> bool:
    """An int that is not a bool (JSON's true would pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class S4FusionConfig:
    """Hyper-parameters of the network; the defaults are the authors' released model.

    ``fuse_level0``: the released code computes the level-0 (full-resolution) CMSA fusion but
    never uses it, so with ``False`` (default) that layer is neither built nor run and the output
    is exactly the authors'; ``True`` builds it and adds it to the decoder output before the
    head, the U-Net reading of the paper's figure (a variant that needs its own training).

    ``base``: 'none' (the authors') outputs the head's image; 'laplacian' adds the head's output
    to the 4-level Laplacian-pyramid fusion of the inputs (``pyramid.laplacian_fuse``), so the
    network learns a correction of a classical fusion (``start_at_base`` makes it start there).

    ``detail_gain`` and ``base_contrast``: the gain of the Laplacian base's details and the
    stretch of its low-pass base about the image's mean (``laplacian_fuse``), 1 for the classical
    fusion.
    """

    dims: tuple = (48, 96, 192)
    encoder_depths: tuple = (1, 2, 1)
    decoder_depths: tuple = (1, 2, 1)
    d_state: int = 12
    fusion_d_state: int = 18
    fusion_blocks: int = 3
    ssm_ratio: float = 1.5
    d_conv: int = 3
    patch_size: int = 4
    patch_stride: int = 3
    fuse_level0: bool = False
    base: str = 'none'
    detail_gain: float = 1.0
    base_contrast: float = 1.0

    def __post_init__(self):
        """Store sequences as tuples (hashable, JSON lists accepted) and check consistency."""
        for name in ('dims', 'encoder_depths', 'decoder_depths'):
            values = tuple(getattr(self, name))
            if not all(_is_integer(value) for value in values):  # not rounded: 16.7 is no width
                raise ValueError(f'{name} must be integers, got {values}')
            object.__setattr__(self, name, values)
        levels = len(self.dims)
        if not (len(self.encoder_depths) == len(self.decoder_depths) == levels >= 1):
            raise ValueError(f'dims, encoder_depths and decoder_depths need one entry per level, '
                             f'got {self.dims}, {self.encoder_depths}, {self.decoder_depths}')
        if (any(b != 2 * a for a, b in zip(self.dims, self.dims[1:])) or self.dims[0] % 4
                or self.dims[0] < 4):
            # merging doubles the width, expanding halves it; the head folds dims[0] / 4 channels
            raise ValueError(f'dims must double per level from a multiple of 4, got {self.dims}')
        sizes = {name: getattr(self, name) for name in (
            'd_state', 'fusion_d_state', 'fusion_blocks', 'd_conv', 'patch_size', 'patch_stride')}
        bad = {name: value for name, value in sizes.items()
               if not _is_integer(value) or value < 1}
        if bad or self.d_conv % 2 == 0:  # an even depthwise kernel would shift the sequence
            raise ValueError(f'sizes must be integers >= 1 and d_conv odd, got {bad or sizes}')
        if not isinstance(self.fuse_level0, bool):
            raise ValueError(f'fuse_level0 must be true or false, got {self.fuse_level0!r}')
        if min(self.encoder_depths + self.decoder_depths) < 0:
            raise ValueError(f'depths must be >= 0, got {self.encoder_depths}, '
                             f'{self.decoder_depths}')
        for name in ('ssm_ratio', *BASE_ENHANCEMENTS):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):  # not "1.1"
                raise ValueError(f'{name} must be a number, got {value!r}')
            object.__setattr__(self, name, float(value))
        if not (0 < self.ssm_ratio <= MAX_SSM_RATIO and int(self.ssm_ratio * self.dims[0]) >= 1):
            raise ValueError(f'ssm_ratio must be at most {MAX_SSM_RATIO} and give the first '
                             f'level at least one inner channel, got {self.ssm_ratio}')
        if self.patch_size < self.patch_stride:
            raise ValueError('patch_size < patch_stride would leave pixels no patch covers')
        if self.base not in BASES:
            raise ValueError(f'base must be one of {BASES}, got {self.base!r}')
        for name in BASE_ENHANCEMENTS:
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0 or (self.base != 'laplacian'
                                                          and value != 1.0):
                raise ValueError(f'{name} must be finite, > 0 and needs the laplacian base, got '
                                 f'{value} with base {self.base!r}')

    @property
    def fusion_levels(self) -> range:
        """The levels with a CMSA fusion layer (level 0 only with ``fuse_level0``)."""
        return range(0 if self.fuse_level0 else 1, len(self.dims))

    @property
    def blocks(self) -> int:
        """The network's blocks (two encoders, the fusion layers, the decoder), each with
        tensors of its own."""
        return (2 * sum(self.encoder_depths) + sum(self.decoder_depths)
                + self.fusion_blocks * len(self.fusion_levels))

    @classmethod
    def presets(cls):
        """Named configurations: ``authors`` (the released model) and ``compact`` (CPU).

        ``compact`` keeps the architecture (levels, depths, interleaved two-modality scans) for
        CPU inference: widths / 3 (the full-resolution scans dominate and scale with width),
        encoder/decoder state 12 -> 8, fusion state 18 -> 12 (the fusion scans run at 1/2 and
        1/4 scale only, so they keep more state), 2 fusion blocks per level instead of 3.
        About a ninth of the parameters (0.39 M against 3.41 M) and a fifth of the scan's state
        updates (0.30 G against 1.61 G at 640x480); at 640x480 on two CPU cores the network runs
        at about 3.5 frames per second against about 1.1 s per frame for ``authors``
        (docs/performance.md). It refines a Laplacian-pyramid fusion (``base``): trained on the
        CPU, the network alone stayed behind that pyramid on detail and closeness to the sources
        (docs/training-history.md). The base's details get a gain of 1.1 and its low-pass base
        a contrast of 1.4, both chosen on the validation splits: the network's correction is
        smooth (it changes contrast and intensity, not detail), at gain 1 the output fell behind
        the pyramid alone on SF and AG on the RoadScene sets, and the mean of the two bases keeps
        half of a region's contrast where only one camera sees it.
        """
        return {
            'authors': cls(),
            'compact': cls(dims=(16, 32, 64), d_state=8, fusion_d_state=12, fusion_blocks=2,
                           base='laplacian', detail_gain=1.1, base_contrast=1.4),
        }

    @classmethod
    def preset(cls, name):
        """The configuration of a named preset."""
        presets = cls.presets()
        if name not in presets:
            raise ValueError(f'unknown S4Fusion preset {name!r}, expected one of '
                             f'{sorted(presets)}')
        return presets[name]

    def preset_name(self):
        """Name of the preset this configuration equals, or None."""
        return next((n for n, preset in self.presets().items() if preset == self), None)

    def network_name(self):
        """Name of the preset whose network this is, its base's enhancements aside, or None."""
        def network(config):
            return replace(config, **dict.fromkeys(BASE_ENHANCEMENTS, 1.0))
        return next((n for n, preset in self.presets().items()
                     if network(preset) == network(self)), None)

    def describe(self):
        """How reports name this configuration: ``preset compact``, ``the compact network`` (at
        other base settings) or ``a custom network``. Read from the config itself: the JSON's
        ``preset`` key is a label anyone can edit."""
        preset, network = self.preset_name(), self.network_name()
        if preset:
            return f'preset {preset}'
        return f'the {network} network' if network else 'a custom network'

    def to_dict(self):
        """JSON-ready dict (lists for sequences)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values):
        """Inverse of ``to_dict``; unknown keys are an error (a newer or foreign config)."""
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f'unknown S4Fusion config keys: {sorted(unknown)}')
        return cls(**values)

    def padding(self, height, width):
        """Zero padding ``(left, right, top, bottom)`` that makes the token grid fit the network.

        Each side grows to the next size whose patch grid has a multiple of 2^(levels - 1)
        tokens (12k + 1 pixels for the defaults), at least one such multiple, split as the
        authors split it: the smaller half first.
        """
        def pad(side):
            multiple = 2 ** (len(self.dims) - 1)
            tokens = math.ceil(max(side - self.patch_size, 0) / self.patch_stride) + 1
            tokens = multiple * max(1, math.ceil(tokens / multiple))
            rest = self.patch_stride * (tokens - 1) + self.patch_size - side
            return rest // 2, rest - rest // 2

        return (*pad(width), *pad(height))


class FoldHead(nn.Module):
    """Tokens back to pixels: Linear, fold with overlaps summed, 1x1 conv; no output activation.

    Each token's Linear C -> (C/4) p^2 is a p x p patch of C/4 channels placed at the embedding
    stride; overlapping patches add up, and a 1x1 conv makes the one output channel.
    """

    def __init__(self, dim, patch_size=4, stride=3, device=None, dtype=None):
        super().__init__()
        kw = {'device': device, 'dtype': dtype}
        self.patch_size, self.stride = patch_size, stride
        self.expand = nn.Linear(dim, dim // 4 * patch_size ** 2, bias=False, **kw)
        self.conv = nn.Conv2d(dim // 4, 1, 1, **kw)

    def forward(self, x, size):
        """``(B, h, w, C) -> (B, 1, H, W)`` with ``size = (H, W)`` the padded image size."""
        x = self.expand(x).flatten(1, 2).transpose(1, 2)  # (B, (C/4) p p, h w)
        x = F.fold(x, size, self.patch_size, stride=self.stride)  # (B, C/4, H, W)
        return self.conv(x)


class S4Fusion(nn.Module):
    """S4Fusion: two VSS encoders, CMSA fusion of their skip features, a VSS decoder, fold head.

    ``forward(ir, vi)`` takes infrared and visible luminance ``(B, 1, H, W)`` in [0, 1], any
    H and W, and returns the fused luminance ``(B, 1, H, W)``, not clamped.
    """

    def __init__(self, config=None, device=None, dtype=None):
        super().__init__()
        self.config = c = config if config is not None else S4FusionConfig()
        kw = {'device': device, 'dtype': dtype}
        ssm = {'d_conv': c.d_conv, 'expand': c.ssm_ratio, **kw}
        levels = len(c.dims)

        self.patch_embed_ir = PatchEmbed(c.dims[0], c.patch_size, c.patch_stride, **kw)
        self.patch_embed_vi = PatchEmbed(c.dims[0], c.patch_size, c.patch_stride, **kw)

        def encoder():
            return nn.ModuleList(
                VSSLayer(dim, depth, c.d_state, downsample=level < levels - 1, **ssm)
                for level, (dim, depth) in enumerate(zip(c.dims, c.encoder_depths)))

        self.encoder_ir, self.encoder_vi = encoder(), encoder()
        # Keyed by level so the keys match the authors' list indices whether or not level 0 is
        # built (see S4FusionConfig.fuse_level0).
        self.fusion_layers = nn.ModuleDict({
            str(level): CMSALayer(c.dims[level], c.fusion_blocks, c.fusion_d_state, **ssm)
            for level in c.fusion_levels})
        self.decoder = nn.ModuleList(
            VSSLayer(dim, depth, c.d_state, upsample=i > 0, **ssm)
            for i, (dim, depth) in enumerate(zip(c.dims[::-1], c.decoder_depths)))
        self.head = FoldHead(c.dims[0], c.patch_size, c.patch_stride, **kw)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        """The authors' (VMamba's) init; the SSM parameters keep their own from SS2D."""
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @torch.no_grad()
    def start_at_base(self):
        """Zero the head's last layer: a model with a base then outputs exactly its base, the
        start of training from scratch (gradients still reach that layer). Returns the model."""
        if self.config.base == 'none':
            raise ValueError('start_at_base needs a configuration with a base')
        nn.init.zeros_(self.head.conv.weight)
        nn.init.zeros_(self.head.conv.bias)
        return self

    def set_detail_gain(self, gain):
        """Change the gain on the Laplacian base's details (``S4FusionConfig.detail_gain``); a
        ValueError without that base. Returns the model."""
        self.config = replace(self.config, detail_gain=gain)
        return self

    def num_parameters(self):
        """Number of parameters (all trainable)."""
        return sum(p.numel() for p in self.parameters())

    def set_scan_backend(self, backend):
        """Force one selective-scan backend ('mamba', 'numba', 'torch') in every block, or None
        for the per-call choice (the default). Returns the model."""
        if backend not in (None, *BACKENDS):
            raise ValueError(f'unknown scan backend {backend!r}; expected one of {BACKENDS} '
                             f'or None')
        for module in self.modules():
            if isinstance(module, SS2D):
                module.scan_backend = backend
        return self

    def forward(self, ir, vi):
        """``(B, 1, H, W) x 2 -> (B, 1, H, W)``: pad, encode, fuse, decode, crop."""
        if (ir.dim() != 4 or ir.shape[1] != 1 or ir.shape != vi.shape or ir.dtype != vi.dtype
                or ir.device != vi.device):
            raise ValueError(f'expected IR and VI of one shape (B, 1, H, W), dtype and device, '
                             f'got {tuple(ir.shape)} {ir.dtype} {ir.device} and '
                             f'{tuple(vi.shape)} {vi.dtype} {vi.device}')
        height, width = ir.shape[2:]
        base = None
        if self.config.base == 'laplacian':
            # Full precision under autocast too: the base is most of the image, and reduced
            # precision flips its per-level choices of detail at near-ties. Float32 at least:
            # a float64 model keeps float64.
            dtype = torch.promote_types(ir.dtype, torch.float32)
            with torch.autocast(ir.device.type, enabled=False):
                base = laplacian_fuse(ir.to(dtype), vi.to(dtype),
                                      detail_gain=self.config.detail_gain,
                                      base_contrast=self.config.base_contrast).to(ir.dtype)
        left, right, top, bottom = pad = self.config.padding(height, width)
        ir, vi = F.pad(ir, pad), F.pad(vi, pad)
        ir, vi = self.patch_embed_ir(ir), self.patch_embed_vi(vi)  # (B, h, w, C0)

        fused = {}  # level -> (B, h / 2^level, w / 2^level, C_level)
        for level, (stage_ir, stage_vi) in enumerate(zip(self.encoder_ir, self.encoder_vi)):
            if str(level) in self.fusion_layers:  # skips are taken before each stage
                fused[level] = self.fusion_layers[str(level)](ir, vi)
            ir, vi = stage_ir(ir), stage_vi(vi)

        x = ir + vi  # deepest features: (B, h/4, w/4, C2) for three levels
        for i, stage in enumerate(self.decoder):
            x = stage(x)  # now at level (levels - 1 - i)
            level = len(self.decoder) - 1 - i
            if level in fused:
                x = x + fused[level]

        x = self.head(x, (top + height + bottom, left + width + right))
        x = x[..., top:top + height, left:left + width]
        return x if base is None else x + base

    def infer(self, ir, vi, amp_dtype=None):
        """Fuse floating-point (B, 1, H, W) images in [0, 1] for inference: no autograd, inputs
        moved to the model's device and dtype.

        ``amp_dtype`` (torch.float16 or torch.bfloat16) autocasts on CUDA and is ignored on other
        devices, where reduced precision is slower, not faster. Returns float32.
        """
        if amp_dtype not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f'amp_dtype must be None, float16 or bfloat16, got {amp_dtype}')
        for name, image in (('ir', ir), ('vi', vi)):
            if not image.is_floating_point():  # uint8 would pass as 0-255 and fuse wrongly
                raise TypeError(f'{name} must be a floating-point image in [0, 1], got '
                                f'{image.dtype}')
        weight = self.head.conv.weight
        use_amp = amp_dtype is not None and weight.device.type == 'cuda'
        with torch.inference_mode(), torch.autocast(weight.device.type, dtype=amp_dtype,
                                                    enabled=use_amp):
            fused = self(ir.to(weight.device, weight.dtype), vi.to(weight.device, weight.dtype))
        return fused.float()
