"""The S4Fusion training loss (design doc, "Training loss"); pretrained-network terms optional.

total = ssim_weight * sum_s w_s (1 - SSIM(F, S)) + l1_weight * sum_s w_s |F - S|
        + grad_weight * |Sobel(F) - max(Sobel(IR), Sobel(VI))| + entropy_weight * H(classifier(F))
        [+ max_intensity_weight * |F - max(IR, VI)|, off by default: not the authors' term]
        [+ teacher_weight * (|F - T| + |Sobel(F) - Sobel(T)|), T a frozen teacher network's
         fusion of the same crop: distillation, off by default; the Sobel term compares the
         gradient magnitudes, or with teacher_edges='components' the signed x and y derivatives]

The per-image source weights w_s are a softmax at temperature c of each source's gradient-energy
score. The authors score the sources on a pretrained ResNet-50's stage features and add the entropy
of a pretrained ImageNet classifier on F. ImageNet weights cannot be obtained here, so by default
the score is computed on the image's own gradients at three pyramid scales and the entropy term is
off (a deviation the trainer records); both pretrained-network parts work with any module the user
supplies (``feature_extractor``, ``classifier``).
"""

import hashlib
import json
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..imaging.filters import (SOBEL_X, SOBEL_Y, SSIM_SIGMA, SSIM_WINDOW_SIZE, ssim_map,
                               ssim_window)


TEACHER_EDGES = ('magnitude', 'components')


def _sobel_kernels():
    return torch.tensor(np.stack([SOBEL_X, SOBEL_Y]), dtype=torch.float32)[:, None]  # (2, 1, 3, 3)


def _magnitude(xy):
    """|d/dx| + |d/dy| from ``sobel_xy``'s (B, C, 2, H, W) derivatives: (B, C, H, W)."""
    return xy.abs().sum(2)


def teacher_error(has_teacher, teacher_weight, teacher_edges='magnitude'):
    """Why the teacher settings do not go together ('' when they do): a teacher needs a weight
    > 0, a weight a teacher, and an edge comparison other than the default a teacher to compare
    with (without one it would be recorded nowhere and do nothing)."""
    if not math.isfinite(teacher_weight) or teacher_weight < 0 or has_teacher != (
            teacher_weight != 0):
        return (f'a teacher and a teacher weight > 0 go together, got '
                f'{"a" if has_teacher else "no"} teacher and weight {teacher_weight}')
    if teacher_edges not in TEACHER_EDGES:
        return f'teacher_edges must be one of {", ".join(TEACHER_EDGES)}, got {teacher_edges!r}'
    if not has_teacher and teacher_edges != 'magnitude':
        return (f'teacher_edges {teacher_edges!r} compares the edges with a teacher\'s, and there '
                'is none')
    return ''


def complete_config(config):
    """A recorded loss configuration (``S4FusionLoss.config()``) with the fields added since it
    was written, at the values that run used: before ``teacher_edges`` a teacher's gradients were
    compared as magnitudes."""
    if 'teacher_sha256' in config:
        return {'teacher_edges': 'magnitude', **config}
    return config


def _state_digest(module):
    """sha256 of a module's configuration (where it has one, as S4Fusion does) and state: which
    teacher a run learned from, so that a resumed run cannot switch teachers unnoticed."""
    digest = hashlib.sha256()
    config = getattr(module, 'config', None)
    if hasattr(config, 'to_dict'):
        digest.update(json.dumps(config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _ssim_window():
    window = ssim_window()
    return torch.from_numpy(window @ window.T).float()[None, None]  # (1, 1, 11, 11)


class S4FusionLoss(nn.Module):
    """Weighted SSIM + weighted L1 + max-gradient L1 (+ optional classifier entropy).

    ``forward(fused, ir, vi)`` takes (B, 1, H, W) tensors (sources in [0, 1]) and returns
    ``(total, terms)``: the scalar loss and a dict of detached scalars ('ssim', 'l1', 'grad',
    'max_intensity' when weighted, 'entropy' when a classifier is set, and 'w_ir', the batch-mean
    weight of the IR source).
    """

    def __init__(self, ssim_weight=1.0, l1_weight=2.0, grad_weight=1.0, entropy_weight=0.01,
                 temperature=1.0, scales=3, feature_extractor=None, classifier=None,
                 max_intensity_weight=0.0, teacher=None, teacher_weight=0.0,
                 teacher_edges='magnitude'):
        """Term weights and the energy score's settings.

        The authors published no weights, so the defaults were chosen to make the three terms
        contribute about equally at a plain starting point, the average of the sources: on 64
        random 97-pixel crops of the training split then (RoadScene and MSRS, 158 pairs) that
        image scored 1 - SSIM 0.23, L1 0.11 and max-gradient L1 0.17 (unnormalised Sobel,
        |gx| + |gy|), 0.23, 0.22 and 0.17 weighted. On the current 401-pair split (M3SVD added;
        no gain augmentation) it scores 0.27, 0.17 and 0.14, weighted 0.27, 0.34 and 0.14: no
        longer equal, the L1 term about twice the gradient term's share.
        The entropy of a K-class prediction is at most log K (6.9 for ImageNet), so 0.01 keeps it
        a regulariser.
        ``temperature`` c acts on the log of the energy, which makes the weights independent of the
        features' scale (image gradients and network features differ by orders of magnitude):
        c = 1 gives weights proportional to the energies, smaller c sharpens the choice.
        ``scales`` is the number of pyramid levels of the image-gradient score.
        ``feature_extractor`` maps (B, 1, H, W) in [0, 1] to a tensor or a list of (B, C, h, w)
        feature maps whose energy replaces the image-gradient score; ``classifier`` maps
        (B, 1, H, W) to logits (B, K). Both are frozen here and must already be in eval mode.
        ``max_intensity_weight`` > 0 adds SeAFusion's per-pixel intensity term, L1 to the brighter
        source: unlike the per-image source weights it holds every region to the source that is
        bright there.
        ``teacher`` (a fusion network ``(ir, vi) -> fused``, frozen, in eval mode) with
        ``teacher_weight`` > 0 pulls F towards the teacher's image and its edges, in [0, 1]
        units: a warm start that transfers a stronger fusion faster than the unsupervised
        terms find one (the CPU budget of the authors preset, docs/training-history.md).
        ``teacher_edges`` is what the teacher's gradient term compares: 'magnitude' (|d/dx| +
        |d/dy|) or 'components' (the signed d/dx and d/dy each). Magnitudes are blind to an edge's
        sign and orientation (a dark-to-bright step matches a bright-to-dark one), so a student
        can match them with edges the teacher does not have; components hold it to the teacher's.
        """
        super().__init__()
        if temperature <= 0 or scales < 1:
            raise ValueError('temperature must be > 0 and scales >= 1')
        self.ssim_weight, self.l1_weight = ssim_weight, l1_weight
        self.grad_weight, self.entropy_weight = grad_weight, entropy_weight
        self.max_intensity_weight = max_intensity_weight
        self.temperature, self.scales = temperature, scales
        error = teacher_error(teacher is not None, teacher_weight, teacher_edges)
        if error:
            raise ValueError(error)
        self.feature_extractor, self.classifier = feature_extractor, classifier
        self.teacher, self.teacher_weight = teacher, teacher_weight
        self.teacher_edges = teacher_edges
        self.teacher_digest = None if teacher is None else _state_digest(teacher)
        # Recorded so that a resumed run cannot switch pretrained networks unnoticed either.
        self.features_digest = (None if feature_extractor is None
                                else _state_digest(feature_extractor))
        self.classifier_digest = None if classifier is None else _state_digest(classifier)
        for module in (feature_extractor, classifier, teacher):
            if module is not None:
                module.requires_grad_(False)
        self.register_buffer('sobel', _sobel_kernels(), persistent=False)
        self.register_buffer('window', _ssim_window(), persistent=False)

    def config(self):
        """The settings as a JSON-ready dict (recorded beside the trained weights)."""
        return {
            'ssim_weight': self.ssim_weight, 'l1_weight': self.l1_weight,
            'grad_weight': self.grad_weight, 'max_intensity_weight': self.max_intensity_weight,
            'entropy_weight': self.entropy_weight if self.classifier is not None else 0.0,
            'temperature': self.temperature,
            'ssim_window': SSIM_WINDOW_SIZE, 'ssim_sigma': SSIM_SIGMA,
            'energy_score': ('pretrained features' if self.feature_extractor is not None
                             else f'image Sobel energy, {self.scales} pyramid scales'),
            **({'features_sha256': self.features_digest}
               if self.feature_extractor is not None else {}),
            **({'classifier_sha256': self.classifier_digest}
               if self.classifier is not None else {}),
            **({'teacher_weight': self.teacher_weight, 'teacher_sha256': self.teacher_digest,
                'teacher_edges': self.teacher_edges}
               if self.teacher is not None else {}),
        }

    def sobel_xy(self, x):
        """Sobel derivatives per channel: (B, C, H, W) -> (B, C, 2, H, W), replicated border."""
        b, c, h, w = x.shape
        x = F.pad(x.reshape(b * c, 1, h, w), (1, 1, 1, 1), mode='replicate')
        return F.conv2d(x, self.sobel.to(x.dtype)).reshape(b, c, 2, h, w)

    def gradient(self, x):
        """|d/dx| + |d/dy| of a (B, 1, H, W) image (the usual fusion-loss gradient)."""
        return _magnitude(self.sobel_xy(x))

    def edge_error(self, fused_xy, taught):
        """Mean per-pixel error of the fused image's edges (its ``sobel_xy``) against those of the
        teacher's image ``taught``, per ``teacher_edges``."""
        taught_xy = self.sobel_xy(taught)
        if self.teacher_edges == 'components':
            return (fused_xy - taught_xy).abs().sum(2).mean()
        return (_magnitude(fused_xy) - _magnitude(taught_xy)).abs().mean()

    def ssim(self, x, y):
        """Per-image mean SSIM, (B,): Gaussian window 11, sigma 1.5, data range 1, valid region."""
        window = self.window.to(x.dtype)
        return ssim_map(x, y, lambda a: F.conv2d(a, window), 1.0).flatten(1).mean(1)

    def energy(self, image):
        """Gradient-energy score of each image, (B,): mean squared Sobel magnitude of its features.

        The features are the user's network's maps, or else the image at ``scales`` pyramid levels
        (each halving the size), averaged over levels so coarse structure counts as well as fine.
        """
        if self.feature_extractor is not None:
            features = self.feature_extractor(image)
            features = [features] if torch.is_tensor(features) else list(features)
        else:
            features = [image]
            for _ in range(self.scales - 1):
                features.append(F.avg_pool2d(features[-1], 2))
        return torch.stack([self.sobel_xy(f).pow(2).sum(2).flatten(1).mean(1)
                            for f in features]).mean(0)

    @torch.no_grad()
    def source_weights(self, ir, vi):
        """Per-image softmax weights of the sources, (B, 2) as (w_ir, w_vi); rows sum to 1."""
        energies = torch.stack([self.energy(ir), self.energy(vi)], dim=1)
        return torch.softmax(torch.log(energies.float() + 1e-12) / self.temperature, dim=1)

    def entropy(self, fused):
        """Mean entropy (nats) of the classifier's prediction on the fused images."""
        log_p = torch.log_softmax(self.classifier(fused).float(), dim=1)
        return -(log_p.exp() * log_p).sum(1).mean()

    def forward(self, fused, ir, vi):
        """Loss of fused images ``fused`` for sources ``ir``, ``vi``; returns (total, terms)."""
        weights = self.source_weights(ir, vi).to(fused.dtype)
        w_ir, w_vi = weights[:, 0], weights[:, 1]
        ssim_term = (w_ir * (1 - self.ssim(fused, ir)) + w_vi * (1 - self.ssim(fused, vi))).mean()
        l1_term = (w_ir * (fused - ir).abs().flatten(1).mean(1)
                   + w_vi * (fused - vi).abs().flatten(1).mean(1)).mean()
        fused_xy = self.sobel_xy(fused)  # (B, 1, 2, H, W), for the gradient and teacher terms
        target = torch.maximum(self.gradient(ir), self.gradient(vi))
        grad_term = (_magnitude(fused_xy) - target).abs().mean()
        total = (self.ssim_weight * ssim_term + self.l1_weight * l1_term
                 + self.grad_weight * grad_term)
        terms = {'ssim': ssim_term, 'l1': l1_term, 'grad': grad_term}
        if self.max_intensity_weight > 0:
            terms['max_intensity'] = (fused - torch.maximum(ir, vi)).abs().mean()
            total = total + self.max_intensity_weight * terms['max_intensity']
        if self.teacher is not None:
            with torch.no_grad():
                taught = self.teacher(ir, vi)
            terms['teacher'] = (fused - taught).abs().mean() + self.edge_error(fused_xy, taught)
            total = total + self.teacher_weight * terms['teacher']
        if self.classifier is not None:
            terms['entropy'] = self.entropy(fused)
            total = total + self.entropy_weight * terms['entropy']
        terms = {k: v.detach() for k, v in terms.items()}
        terms['w_ir'] = w_ir.mean().detach()
        return total, terms
