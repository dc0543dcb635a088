"""Classical baselines and the SeAFusion peer network, on synthetic and real TNO pairs."""

import functools
import pickle

import cv2
import numpy as np
import pytest
import torch

from s4fusion_ros.evaluation import baselines as B
from s4fusion_ros.evaluation import metrics as M
from s4fusion_ros.evaluation import seafusion as S
from s4fusion_ros.model.pyramid import laplacian_fuse, pyr_down, pyr_up

from support import ALL_TNO, read_gray, read_reference, REFERENCE_METRICS, TNO_IMAGES

FUSERS = (B.fuse_average, B.fuse_max, B.fuse_laplacian, B.fuse_gff)


@pytest.fixture(scope='module')
def rng_pair():
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (45, 61), dtype=np.uint8),
            rng.integers(0, 256, (45, 61), dtype=np.uint8))


@pytest.mark.parametrize('fuse', FUSERS)
def test_contract_float32_unit_range(fuse, rng_pair):
    ir, vi = rng_pair
    out = fuse(ir, vi)
    assert out.dtype == np.float32 and out.shape == ir.shape
    assert 0.0 <= out.min() and out.max() <= 1.0
    # uint8 input means value / 255, float input is taken as [0, 1].
    np.testing.assert_allclose(fuse(ir / 255.0, vi / 255.0), out, atol=1e-6)


@pytest.mark.parametrize('fuse', FUSERS)
def test_rejects_colour_and_mismatched_shapes(fuse):
    gray = np.zeros((8, 8), np.uint8)
    with pytest.raises(ValueError, match='gray'):
        fuse(gray, np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match='differ'):
        fuse(gray, np.zeros((8, 9), np.uint8))


def test_average_and_max_values(rng_pair):
    ir, vi = rng_pair
    a, b = ir.astype(np.float32) / 255, vi.astype(np.float32) / 255
    np.testing.assert_allclose(B.fuse_average(ir, vi), (a + b) / 2, atol=1e-7)
    np.testing.assert_array_equal(B.fuse_max(ir, vi), np.maximum(a, b))


@pytest.mark.parametrize('shape', [(45, 61), (480, 640), (37, 50)])
def test_torch_pyramid_steps_equal_opencv(shape):
    """The pyramid (model.pyramid, also the network's base) is OpenCV's pyrDown / pyrUp."""
    image = np.random.default_rng(2).random(shape, dtype=np.float32)
    tensor = torch.from_numpy(image)[None, None]
    down = pyr_down(tensor)
    np.testing.assert_allclose(down[0, 0].numpy(), cv2.pyrDown(image), atol=1e-6)
    up = pyr_up(down, shape)
    np.testing.assert_allclose(up[0, 0].numpy(),
                               cv2.pyrUp(cv2.pyrDown(image), dstsize=shape[::-1]), atol=1e-6)


MULTISCALE = (B.fuse_laplacian, B.fuse_gff)


@pytest.mark.parametrize('fuse', MULTISCALE)
def test_multiscale_baselines_reconstruct_identical_inputs(fuse, rng_pair):
    img = rng_pair[0]
    np.testing.assert_allclose(fuse(img, img), img / 255.0, atol=1e-5)


@pytest.mark.parametrize('fuse', MULTISCALE)
def test_multiscale_baselines_take_detail_from_the_textured_source(fuse):
    rng = np.random.default_rng(1)
    vi = (0.25 + 0.5 * rng.random((128, 160))).astype(np.float32)
    ir = np.full_like(vi, 0.5)
    fused = fuse(ir, vi)
    # The details come from VI alone (the pyramid's detail levels, GFF's detail weights, which
    # follow VI's Laplacian); only the coarse base is shared with IR.
    high_pass = cv2.Laplacian(fused - vi, cv2.CV_32F)
    assert np.abs(high_pass).mean() < 0.01 * np.abs(cv2.Laplacian(vi, cv2.CV_32F)).mean()
    assert fused.mean() == pytest.approx((vi.mean() + 0.5) / 2, abs=0.01)


def test_laplacian_on_tiny_images_is_the_average():
    a, b = np.full((5, 7), 0.2, np.float32), np.full((5, 7), 0.6, np.float32)
    np.testing.assert_allclose(B.fuse_laplacian(a, b), B.fuse_average(a, b), atol=1e-7)


def classical_laplacian_fusion(ir, vi, levels):
    """Burt and Adelson's fusion spelled out on the pyramid steps (OpenCV's, tested above): at
    every level the detail of larger magnitude (ties to ir), then the mean of the bases."""
    details, bases = [], (ir, vi)
    for _ in range(levels):
        downs = [pyr_down(image) for image in bases]
        ir_detail, vi_detail = (image - pyr_up(down, image.shape[-2:])
                                for image, down in zip(bases, downs))
        details.append(torch.where(ir_detail.abs() >= vi_detail.abs(), ir_detail, vi_detail))
        bases = downs
    fused = (bases[0] + bases[1]) / 2
    for detail in reversed(details):
        fused = pyr_up(fused, detail.shape[-2:]) + detail
    return fused


# As many detail levels as keep the base 8 pixels or more on its short side, at most 4.
@pytest.mark.parametrize('size, levels', [((640, 480), 4), ((80, 60), 2), ((15, 12), 0)])
def test_laplacian_fusion_is_the_classical_one_with_the_levels_that_fit(msrs_pair, size, levels):
    ir, vi = (torch.from_numpy(cv2.resize(image, size, interpolation=cv2.INTER_AREA)
                               / np.float32(255))[None, None]
              for image in (msrs_pair[0], cv2.cvtColor(msrs_pair[1], cv2.COLOR_BGR2GRAY)))
    assert torch.equal(laplacian_fuse(ir, vi), classical_laplacian_fusion(ir, vi, levels))
    # An image and its negative tie in detail magnitude everywhere: the details are ir's.
    signed = ir - ir.mean()
    assert torch.equal(laplacian_fuse(signed, -signed),
                       classical_laplacian_fusion(signed, -signed, levels))


def test_guided_filter_limits():
    """Small eps keeps the guide's edges (filtering the guide returns it); huge eps leaves the
    mean of window means; windows are clipped at the border, so a constant stays constant."""
    rng = np.random.default_rng(3)
    guide = rng.random((40, 50), dtype=np.float32)
    image = rng.random((40, 50), dtype=np.float32)
    np.testing.assert_allclose(B.guided_filter(guide, guide, 3, 1e-8), guide, atol=1e-4)
    window_mean = B._window_mean(3, image)
    twice = window_mean(window_mean(image))
    np.testing.assert_allclose(B.guided_filter(guide, image, 3, 1e9), twice, atol=1e-5)
    constant = np.full((40, 50), 0.7, np.float32)
    np.testing.assert_allclose(B.guided_filter(guide, constant, 5, 0.3), constant, atol=1e-6)


@pytest.fixture(scope='module')
def tno_small(ivif_dir):
    """Two of the smallest TNO pairs (256x256, 280x280): {name: (ir, vi)}."""
    tno = ivif_dir / 'tno'
    return {name: (read_gray(tno / 'ir' / name), read_gray(tno / 'vi' / name))
            for name in ('08.png', '05.png')}


# GFF's detail weights are smoothed, so its SF and AG lead over the average is smaller (1.27 AG on
# TNO 08, against the pyramid's 1.40).
@pytest.mark.parametrize('fuse, factor', [(B.fuse_laplacian, 1.3), (B.fuse_gff, 1.2)])
def test_multiscale_baselines_keep_more_detail_than_average(fuse, factor, tno_small):
    for ir, vi in tno_small.values():
        avg = M.evaluate_all(255 * B.fuse_average(ir, vi), ir, vi)
        multiscale = M.evaluate_all(255 * fuse(ir, vi), ir, vi)
        assert multiscale['SF'] > factor * avg['SF'] and multiscale['AG'] > factor * avg['AG']
        assert multiscale['Qabf'] > avg['Qabf']


@pytest.fixture(scope='module')
def seafusion_path(ivif_dir):
    return ivif_dir / 'weights' / 'seafusion' / 'SeAFusion.pth'


@pytest.fixture(scope='module')
def seafusion(seafusion_path):
    return S.SeAFusion.from_published(seafusion_path)


def test_seafusion_loads_the_published_state_dict(seafusion, seafusion_path):
    state = torch.load(seafusion_path, map_location='cpu', weights_only=True)
    ours = seafusion.state_dict()
    assert list(ours) == list(state)
    assert sum(t.numel() for t in state.values()) == 167113
    assert all(torch.equal(ours[k], state[k]) for k in state)
    assert not seafusion.training


class _Payload:
    """Anything but tensors and containers: a safe loader must refuse to build it."""


@pytest.mark.parametrize('change', ['missing', 'extra'])
def test_seafusion_refuses_a_state_dict_that_is_not_the_published_one(
        seafusion_path, tmp_path, change):
    # A layer left at its random initialisation would put made-up SeAFusion numbers in the
    # report; s4fusion-eval names such weights from the RuntimeError.
    state = torch.load(seafusion_path, map_location='cpu', weights_only=True)
    if change == 'missing':
        del state['decode1.conv.weight']
    else:
        state['decode0.conv.weight'] = state['decode1.conv.weight']
    path = tmp_path / 'SeAFusion.pth'
    torch.save(state, path, _use_new_zipfile_serialization=False)
    with pytest.raises(RuntimeError, match='decode[01].conv.weight'):
        S.SeAFusion.from_published(path)


def test_seafusion_refuses_pickled_objects(tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'x': _Payload()}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(pickle.UnpicklingError):
        S.SeAFusion.from_published(path)


@pytest.fixture(scope='module')
def seafusion_fuse(seafusion, ivif_dir):
    """Map a TNO name to (ir, vi, SeAFusion output), computed once (about 1 s per 256x256)."""
    @functools.cache
    def run(name):
        ir, vi = (read_gray(ivif_dir / 'tno' / sub / name) for sub in ('ir', 'vi'))
        return ir, vi, seafusion.fuse(ir, vi)
    return run


def test_seafusion_output_is_sane(seafusion, seafusion_fuse):
    ir, vi, fused = seafusion_fuse('08.png')
    assert fused.dtype == np.float32 and fused.shape == ir.shape
    assert 0.0 <= fused.min() < fused.max() <= 1.0
    with pytest.raises(ValueError, match='differ'):
        seafusion.fuse(ir, vi[:-1])


# The smallest TNO pair by default; all 42 agree within 2e-5 (S4FUSION_ALL_TNO=1, ~3 min).
@pytest.mark.parametrize('name', TNO_IMAGES if ALL_TNO else ['08.png'])
def test_seafusion_reproduces_the_published_metrics(seafusion_fuse, ivif_dir, name):
    """Our output, saved the authors' way, scores what the reference lists for SeAFusion.

    This pins the whole network (unused BatchNorm, tanh / 2 + 0.5, VI-first decoder input) and
    the authors' saving step (min-max stretch, truncation to uint8).
    """
    ir, vi, fused = seafusion_fuse(name)
    ref = read_reference(ivif_dir, 'SeAFusion')[name]
    ours = M.evaluate_all(S.published_image(fused), ir, vi, matlab_compat=True)
    for key in REFERENCE_METRICS:
        # Off by a few one-level pixel roundings at most (CPU float32 vs the authors' GPU).
        assert ours[key] == pytest.approx(ref[key], rel=1e-4), key


@pytest.mark.filterwarnings('error')  # a flat image is black, not 0 / 0 cast to uint8
def test_published_image_stretches_and_truncates_a_gray_image():
    out = S.published_image(np.array([[0.2, 0.4], [0.6, 0.6 - 1e-4]], np.float32))
    np.testing.assert_array_equal(out, [[0, 127], [255, 254]])  # truncated: 254.9 -> 254
    assert not S.published_image(np.full((2, 2), 0.3)).any()


def test_published_image_composes_clamps_and_stretches_rgb_as_the_authors_script():
    """Against the authors' test.py written out: their YCrCb2RGB matrix, clamp, one stretch
    over all channels (not per channel, not of the luminance), truncation."""
    rng = np.random.default_rng(3)
    mat = np.array([[1.0, 1.0, 1.0], [1.403, -0.714, 0.0], [0.0, -0.344, 1.773]], np.float32)
    # Saturated colours (the clamp cuts, the stretch then does nothing) and muted ones (the
    # clamped RGB lies inside (0, 1), so the stretch over the three channels matters).
    for chroma in ((0.0, 1.0), (0.45, 0.55)):
        y = rng.uniform(0.3, 0.7, (6, 7)).astype(np.float32)
        cr, cb = (rng.uniform(*chroma, (6, 7)).astype(np.float32) for _ in range(2))
        ycrcb = np.stack([y, cr, cb], -1) + np.float32([0.0, -0.5, -0.5])
        rgb = np.clip(ycrcb @ mat, 0.0, 1.0)
        expected = (255.0 * (rgb - rgb.min()) / (rgb.max() - rgb.min())).astype(np.uint8)
        out = S.published_image(y, (cr, cb))
        assert out.shape == (6, 7, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out[..., ::-1], expected)  # BGR, as OpenCV stores it
    assert 0.0 < rgb.min() and rgb.max() < 1.0  # the muted case did stretch


def test_evaluate_runs_seafusion_on_colour_pairs_as_the_authors_script(seafusion, ivif_dir):
    """s4fusion-eval's SeAFusion keeps the visible colour and stretches the composed RGB image:
    the output's chrominance is the visible image's, its channels span 0-255 together."""
    from s4fusion_ros.imaging.color import bgr_to_ycrcb
    from s4fusion_ros.tools import evaluate, fuse
    pair = fuse.read_pair(fuse.Pair('00004N.png', ivif_dir / 'msrs' / 'ir' / '00004N.png',
                                    ivif_dir / 'msrs' / 'vi' / '00004N.png'))
    crop = np.s_[200:360, 240:440]
    source = fuse.SourcePair(pair.name, pair.thermal[crop], pair.visible_bgr[crop], True)
    out = evaluate.seafusion_method(seafusion)(source, None).fused
    assert out.shape == (160, 200, 3) and out.dtype == np.uint8
    assert out.min() == 0 and out.max() == 255
    vi_y, cr, cb = bgr_to_ycrcb(source.visible_bgr)  # float: their script never rounds it
    np.testing.assert_array_equal(
        out, S.published_image(seafusion.fuse(source.thermal, vi_y), (cr, cb)))
    _, out_cr, out_cb = bgr_to_ycrcb(out)
    unclipped = (out.min(axis=2) > 0) & (out.max(axis=2) < 255)
    assert unclipped.mean() > 0.5
    for got, want in ((out_cr, cr), (out_cb, cb)):
        assert np.abs(got - want)[unclipped].mean() < 2 / 255  # truncation and rounding only
    gray = fuse.SourcePair(pair.name, source.thermal, source.visible_bgr, False)
    np.testing.assert_array_equal(evaluate.seafusion_method(seafusion)(gray, None).fused,
                                  S.published_image(seafusion.fuse(source.thermal, vi_y)))


def test_gff_splits_ties_of_saliency_as_the_paper_does():
    """Li et al.'s eq. 11 gives a pixel's binary weight to every source at the maximum, so where
    both are flat (a saturated sky over a cold one) they share it; no source is preferred."""
    rng = np.random.default_rng(4)
    ir = (0.3 + 0.4 * rng.random((96, 96))).astype(np.float32)
    vi = (0.3 + 0.4 * rng.random((96, 96))).astype(np.float32)
    ir[:40], vi[:40] = 0.02, 1.0  # flat in both: zero saliency, a tie
    fused = B.fuse_gff(ir, vi)
    np.testing.assert_allclose(fused, B.fuse_gff(vi, ir), atol=1e-5)
    np.testing.assert_allclose(fused[:20], (0.02 + 1.0) / 2, atol=0.03)


def _box_sums(image, radius):
    """Sums over the (2 radius + 1)^2 windows of a float64 image, zero outside (integral image)."""
    side = 2 * radius + 1
    total = np.pad(image, ((radius + 1, radius), (radius + 1, radius))).cumsum(0).cumsum(1)
    return (total[side:, side:] - total[:-side, side:]
            - total[side:, :-side] + total[:-side, :-side])


def _gff_as_the_paper_writes_it(ir, vi):
    """Li, Kang and Hu's GFF in float64, unclipped: 31x31 mean bases, saliency |3x3 Laplacian|
    under an 11x11 Gaussian of sigma 5 (replicated borders), binary weights at the maximum, each
    guided by its own source (r 45, eps 0.3 for the bases; r 7, eps 1e-6 for the details)."""
    sources = [s.astype(np.float64) / 255 for s in (ir, vi)]
    bases = [_box_sums(np.pad(s, 15, mode='edge'), 15)[15:-15, 15:-15] / 31 ** 2 for s in sources]
    taps = np.exp(-(np.arange(11) - 5.0) ** 2 / (2 * 5.0 ** 2))
    taps /= taps.sum()

    def saliency(s):
        p = np.pad(s, 1, mode='edge')
        laplacian = np.abs(p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * s)
        p = np.pad(laplacian, 5, mode='edge')
        rows = sum(t * p[i:i + s.shape[0]] for i, t in enumerate(taps))
        return sum(t * rows[:, i:i + s.shape[1]] for i, t in enumerate(taps))

    def guided(guide, image, radius, eps):
        inside = _box_sums(np.ones_like(guide), radius)

        def mean(x):
            return _box_sums(x, radius) / inside

        slope = ((mean(guide * image) - mean(guide) * mean(image))
                 / (mean(guide * guide) - mean(guide) ** 2 + eps))
        return mean(slope) * guide + mean(mean(image) - slope * mean(guide))

    saliencies = [saliency(s) for s in sources]
    chosen = [(s == np.maximum(*saliencies)).astype(np.float64) for s in saliencies]
    fused = 0
    for layers, radius, eps in ((bases, 45, 0.3),
                                ([s - b for s, b in zip(sources, bases)], 7, 1e-6)):
        weights = [guided(s, p, radius, eps) for s, p in zip(sources, chosen)]
        fused = fused + sum(w * layer for w, layer in zip(weights, layers)) / sum(weights)
    return fused


def test_gff_is_the_papers_fusion_with_its_settings(tno_small):
    # The other GFF tests hold for many filter sizes and guides; this pins the paper's.
    for ir, vi in tno_small.values():
        expected = _gff_as_the_paper_writes_it(ir, vi)
        np.testing.assert_allclose(B.fuse_gff(ir, vi), np.clip(expected, 0, 1), atol=1e-5)
        assert expected.min() < -0.04  # the detail weights overshoot at edges: clipped
