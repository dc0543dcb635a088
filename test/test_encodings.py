"""Message decoding (raw, compressed) on real MSRS images, malformed messages, colour helpers."""

import array
import os
import struct
import subprocess
import sys
import tracemalloc
import zlib

import cv2
from hypothesis import given, HealthCheck, settings, strategies as st
import numpy as np
import pytest

from s4fusion_ros.imaging import color
from s4fusion_ros.imaging.encodings import (
    compress_transport, decode_thermal, decode_thermal_info, decode_visible, encode_image, FORMATS,
    image_to_array, ImageDecodeError, jpeg_is_whole, MAX_PIXELS, MAX_SIDE, RawCompressedImage,
    RawImage)
from support import raw_images, zstd_transport_data


@pytest.fixture(scope='module')
def arrays(msrs_pair):
    """Make one array per encoding from the real pair."""
    ir, vi = msrs_pair
    alpha = np.full(ir.shape + (1,), 200, np.uint8)
    return {
        'mono8': ir, '8UC1': ir,
        'mono16': ir.astype(np.uint16) << 6, '16UC1': ir.astype(np.uint16) * 64 + 3,
        '32FC1': ir.astype(np.float32) / 10.0 + 20.25,
        'bgr8': vi, 'rgb8': vi[:, :, ::-1].copy(),
        'bgra8': np.concatenate([vi, alpha], axis=2),
        'rgba8': np.concatenate([vi[:, :, ::-1], alpha], axis=2),
        '8UC3': vi, '8UC4': np.concatenate([vi, alpha], axis=2),
        **dict.fromkeys(['yuv422', 'uyvy', 'yuv422_yuy2', 'yuyv'], np.dstack([vi[:, :, 0], ir])),
        **{f'bayer_{pattern}{bits}': ir if bits == 8 else ir.astype(np.uint16) * 257
           for pattern in ('rggb', 'bggr', 'gbrg', 'grbg') for bits in (8, 16)},
    }


def with_data(img: RawImage, data) -> RawImage:
    """Copy the image fields with another data container."""
    return RawImage(img.height, img.width, img.encoding, img.step, img.is_bigendian, data)


@pytest.mark.parametrize('encoding', sorted(FORMATS))
@pytest.mark.parametrize('bigendian', [False, True])
@pytest.mark.parametrize('padding', [0, 5])
def test_round_trip_every_encoding(arrays, encoding, bigendian, padding):
    source = arrays[encoding]
    img = encode_image(source, encoding, bigendian=bigendian, row_padding=padding)
    itemsize = source.dtype.itemsize
    assert img.is_bigendian == int(bigendian and itemsize > 1)
    assert img.step == source[0].size * itemsize + padding
    for data in (img.data, bytearray(img.data), memoryview(img.data),
                 np.frombuffer(img.data, np.uint8), array.array('B', img.data)):
        out = image_to_array(with_data(img, data))
        assert out.dtype == source.dtype and out.dtype.isnative
        np.testing.assert_array_equal(out, source)


@pytest.mark.parametrize('encoding', ['mono16', '32FC1', 'bayer_rggb16'])
@pytest.mark.parametrize('bigendian', [False, True])
def test_views_of_wide_pixels_are_encoded(arrays, encoding, bigendian):
    # A camera mounted sideways is rotated (np.rot90), a crop is sliced: views whose pixels are
    # not adjacent in memory.
    for view in (np.rot90(arrays[encoding]), arrays[encoding][:, ::2]):
        img = encode_image(view, encoding, bigendian=bigendian, row_padding=1)
        np.testing.assert_array_equal(image_to_array(img), view)


def test_big_endian_bytes_are_swapped(msrs_pair):
    ir = msrs_pair[0].astype(np.uint16) * 257
    img = RawImage(ir.shape[0], ir.shape[1], 'mono16', ir.shape[1] * 2, 1,
                   ir.astype('>u2').tobytes())
    np.testing.assert_array_equal(decode_thermal(img), ir.astype(np.float32))
    temps = np.array([[-40.5, 0.0, 1234.25]], np.float32)
    img = RawImage(1, 3, '32FC1', 12, 1, temps.astype('>f4').tobytes())
    np.testing.assert_array_equal(decode_thermal(img), temps)
    # is_bigendian is a uint8: any value but 0 says big-endian.
    img = RawImage(1, 3, '32FC1', 12, 255, temps.astype('>f4').tobytes())
    np.testing.assert_array_equal(decode_thermal(img), temps)


def test_data_that_is_a_strided_view_is_read(msrs_pair):
    # A uint8 array that is every other byte of another: no buffer of its own to view.
    ir = msrs_pair[0]
    interleaved = np.zeros(2 * ir.size, np.uint8)
    interleaved[::2] = ir.ravel()
    img = RawImage(ir.shape[0], ir.shape[1], 'mono8', ir.shape[1], 0, interleaved[::2])
    np.testing.assert_array_equal(image_to_array(img), ir)


def test_unpadded_rows_are_not_copied(msrs_pair):
    vi = msrs_pair[1]
    data = np.frombuffer(encode_image(vi, 'bgr8').data, np.uint8).copy()
    img = RawImage(vi.shape[0], vi.shape[1], 'bgr8', vi.shape[1] * 3, 0, data)
    assert np.shares_memory(image_to_array(img), data)
    assert np.shares_memory(decode_visible(img), data)


@pytest.mark.parametrize('encoding', ['mono8', '8UC1', 'mono16', '16UC1', '32FC1'])
def test_decode_thermal_gives_float32_raw_values(arrays, encoding):
    source = arrays[encoding]
    result = decode_thermal_info(encode_image(source, encoding, row_padding=3))
    assert result.raw.dtype == np.float32 and not result.from_color
    np.testing.assert_array_equal(result.raw, source.astype(np.float32))


@pytest.mark.parametrize('encoding', ['rgb8', 'bgr8', 'rgba8', 'bgra8'])
def test_colour_on_the_thermal_topic_becomes_luminance(msrs_pair, arrays, encoding):
    ir = msrs_pair[0]
    gray3 = {'rgb8': np.dstack([ir] * 3), 'bgr8': np.dstack([ir] * 3),
             'rgba8': np.dstack([ir] * 4), 'bgra8': np.dstack([ir] * 4)}[encoding]
    result = decode_thermal_info(encode_image(gray3, encoding))
    assert result.from_color and result.raw.shape == ir.shape
    np.testing.assert_allclose(result.raw, ir, atol=1e-3)
    # A real colour image: Y = 0.299 R + 0.587 G + 0.114 B whatever the channel order.
    vi = msrs_pair[1].astype(np.float32)
    expected = 0.299 * vi[:, :, 2] + 0.587 * vi[:, :, 1] + 0.114 * vi[:, :, 0]
    np.testing.assert_allclose(decode_thermal(encode_image(arrays[encoding], encoding)),
                               expected, atol=1e-3)


def test_thermal_32fc1_non_finite_becomes_nan():
    temps = np.array([[20.0, np.nan, np.inf], [-np.inf, 36.6, 0.0]], np.float32)
    raw = decode_thermal(encode_image(temps, '32FC1'))
    np.testing.assert_array_equal(np.isnan(raw), ~np.isfinite(temps))
    assert raw[0, 0] == 20.0 and raw[1, 1] == np.float32(36.6)


@pytest.mark.parametrize('encoding', ['rgb8', 'bgr8', 'rgba8', 'bgra8'])
def test_decode_visible_gives_bgr(msrs_pair, arrays, encoding):
    out = decode_visible(encode_image(arrays[encoding], encoding, row_padding=7))
    assert out.dtype == np.uint8 and out.shape == msrs_pair[1].shape
    np.testing.assert_array_equal(out, msrs_pair[1])


def test_decode_visible_mono(msrs_pair, arrays):
    ir = msrs_pair[0]
    np.testing.assert_array_equal(decode_visible(encode_image(ir, 'mono8')), np.dstack([ir] * 3))
    # 16-bit intensity spans the full range: scaled by 255/65535, like image_view.
    wide = ir.astype(np.uint16) * 257
    np.testing.assert_array_equal(decode_visible(encode_image(wide, 'mono16', bigendian=True)),
                                  np.dstack([ir] * 3))
    # Rows an odd number of bytes apart (legal: step only has to cover the row) start between
    # 16-bit elements, which OpenCV misread from the second row on.
    for encoding in ('mono16', '16UC1'):
        np.testing.assert_array_equal(
            decode_visible(encode_image(wide, encoding, row_padding=3)), np.dstack([ir] * 3))
    with pytest.raises(ImageDecodeError, match='32FC1'):
        decode_visible(encode_image(arrays['32FC1'], '32FC1'))


def mosaic(bgr: np.ndarray, pattern: str) -> np.ndarray:
    """Sample a BGR image as a Bayer sensor of `pattern` (its 2x2 block, row by row) would."""
    channel = {'r': 2, 'g': 1, 'b': 0}
    out = np.empty(bgr.shape[:2], bgr.dtype)
    for index, colour in enumerate(pattern):
        row, column = divmod(index, 2)
        out[row::2, column::2] = bgr[row::2, column::2, channel[colour]]
    return out


@pytest.mark.parametrize('pattern', ['rggb', 'bggr', 'gbrg', 'grbg'])
@pytest.mark.parametrize('bits', [8, 16])
def test_bayer_images_are_demosaiced_to_their_colours(pattern, bits):
    # A flat colour comes back exactly: OpenCV's Bayer codes name another block than the
    # sensor's, and a wrong mapping swaps red and blue or mixes green in.
    scale = 1 if bits == 8 else 257
    dtype = np.uint8 if bits == 8 else np.uint16
    flat = np.empty((8, 12, 3), dtype)
    flat[...] = np.array([30, 120, 220]) * scale
    img = encode_image(mosaic(flat, pattern), f'bayer_{pattern}{bits}', row_padding=3)
    out = decode_visible(img)
    assert out.dtype == np.uint8 and out.shape == (8, 12, 3)
    np.testing.assert_array_equal(out[2:-2, 2:-2], flat[2:-2, 2:-2] // scale)
    thermal = decode_thermal_info(img)  # a colour camera on the thermal topic: its luminance
    assert thermal.from_color and thermal.raw.shape == (8, 12)


@pytest.mark.parametrize('encoding, chroma_first', [('yuv422', True), ('uyvy', True),
                                                    ('yuv422_yuy2', False), ('yuyv', False)])
def test_yuv422_images_keep_their_colour_and_luminance(encoding, chroma_first):
    # Y ramps along the row; U (Cb) low and V (Cr) high make red. Read in the other byte order
    # the luminance would alternate with the chroma values.
    luma = np.tile(np.linspace(60, 200, 16).astype(np.uint8), (4, 1))
    chroma = np.tile(np.array([90, 200], np.uint8), (4, 8))  # U, V, U, V, ...
    packed = np.dstack([chroma, luma] if chroma_first else [luma, chroma])
    out = decode_visible(encode_image(packed, encoding)).astype(int)
    assert (out[:, :, 2] > out[:, :, 0] + 60).all()  # red
    assert (np.diff(out[:, :, 1], axis=1) >= 0).all()  # green follows Y: rising
    thermal = decode_thermal_info(encode_image(packed, encoding))
    assert thermal.from_color and (np.diff(thermal.raw, axis=1) > 0).all()


@pytest.mark.parametrize('encoding, same_as', [('8UC3', 'bgr8'), ('8UC4', 'bgra8')])
def test_generic_colour_encodings_read_as_cv_bridge_does(arrays, encoding, same_as):
    np.testing.assert_array_equal(decode_visible(encode_image(arrays[encoding], encoding)),
                                  decode_visible(encode_image(arrays[same_as], same_as)))


@pytest.mark.parametrize('img, message', [
    (RawImage(2, 5, 'yuv422', 10, 0, bytes(20)), 'yuv422 image: width 5 is odd'),
    (RawImage(1, 4, 'bayer_rggb8', 4, 0, bytes(4)),
     'bayer_rggb8 image: 4x1 is smaller than one 2x2 Bayer block'),
])
def test_camera_native_images_too_small_to_convert_are_refused(img, message):
    for decode in (decode_thermal, decode_visible):
        with pytest.raises(ImageDecodeError, match=message):
            decode(img)


def test_compressed_jpeg_and_png(msrs_pair):
    ir, vi = msrs_pair
    jpeg = RawCompressedImage('jpeg', cv2.imencode('.jpg', vi, [cv2.IMWRITE_JPEG_QUALITY, 95])[1]
                              .tobytes())
    assert cv2.PSNR(decode_visible(jpeg), vi) > 35
    png = RawCompressedImage('bgr8; png compressed bgr8', cv2.imencode('.png', vi)[1])
    np.testing.assert_array_equal(decode_visible(png), vi)
    result = decode_thermal_info(png)
    assert result.from_color and result.raw.shape == ir.shape
    gray_png = RawCompressedImage('png', array.array('B', cv2.imencode('.png', ir)[1].tobytes()))
    np.testing.assert_array_equal(decode_thermal(gray_png), ir.astype(np.float32))
    np.testing.assert_array_equal(decode_visible(gray_png), np.dstack([ir] * 3))


@pytest.mark.parametrize('codec', ['jpeg', 'png'])
@pytest.mark.parametrize('encoding', ['bgr8', 'rgb8', 'mono8'])
def test_the_fused_compressed_transport_reads_back_as_its_encoding(msrs_pair, codec, encoding):
    # As image_transport's compressed plugin writes it: read back by its subscriber's rules
    # (the node's decoder follows them) as the image published raw.
    vi = msrs_pair[1]
    image = {'bgr8': vi, 'rgb8': vi[..., ::-1].copy(),
             'mono8': cv2.cvtColor(vi, cv2.COLOR_BGR2GRAY)}[encoding]
    fmt, data = compress_transport(image, encoding, codec, jpeg_quality=90)
    assert fmt == f'{encoding}; {codec} compressed {"" if encoding == "mono8" else "bgr8"}'
    decoded = decode_visible(RawCompressedImage(fmt, data))  # BGR
    expected = vi if encoding != 'mono8' else np.dstack([image] * 3)
    if codec == 'png':
        np.testing.assert_array_equal(decoded, expected)
    else:
        assert cv2.PSNR(decoded, expected) > 33


def test_compressed_images_of_other_types_are_refused(msrs_pair):
    # A TIFF holds any type OpenCV has: signed, or float colour, is neither camera's image.
    signed = cv2.imencode('.tiff', msrs_pair[0].astype(np.int16) - 128)[1].tobytes()
    for decode in (decode_thermal, decode_visible):
        with pytest.raises(ImageDecodeError, match="'tiff' image: unsupported 1-channel int16"):
            decode(RawCompressedImage('tiff', signed))
    colour = cv2.imencode('.tiff', color.to_float(msrs_pair[1]))[1].tobytes()
    with pytest.raises(ImageDecodeError, match='float colour is not a thermal image'):
        decode_thermal(RawCompressedImage('tiff', colour))


def test_compressed_16bit_png_stays_16bit(msrs_pair):
    counts = msrs_pair[0].astype(np.uint16) * 64 + 5  # 14-bit radiometric counts
    img = RawCompressedImage('16UC1; png compressed', cv2.imencode('.png', counts)[1].tobytes())
    raw = decode_thermal(img)
    assert raw.dtype == np.float32 and raw.max() > 255
    np.testing.assert_array_equal(raw, counts.astype(np.float32))


@pytest.mark.parametrize('pattern', ['rggb', 'bggr', 'gbrg', 'grbg'])
@pytest.mark.parametrize('bits', [8, 16])
def test_compressed_bayer_is_demosaiced_as_a_raw_one(msrs_pair, pattern, bits):
    # image_transport's compressed plugin stores a Bayer image as its mosaic in a PNG and names
    # the encoding before the ';': read by channel count alone it was a gray checkerboard.
    fmt = f'bayer_{pattern}{bits}; png compressed '
    scale = 1 if bits == 8 else 257
    dtype = np.uint8 if bits == 8 else np.uint16
    red = np.zeros((8, 12, 3), dtype)
    red[..., 2] = 220 * scale
    img = RawCompressedImage(fmt, cv2.imencode('.png', mosaic(red, pattern))[1])
    assert (decode_visible(img)[2:-2, 2:-2] == [0, 0, 220]).all()
    sensor = mosaic(msrs_pair[1].astype(dtype) * scale, pattern)
    img = RawCompressedImage(fmt, cv2.imencode('.png', sensor)[1])
    raw = encode_image(sensor, f'bayer_{pattern}{bits}')
    np.testing.assert_array_equal(decode_visible(img), decode_visible(raw))
    thermal = decode_thermal_info(img)
    assert thermal.from_color
    np.testing.assert_array_equal(thermal.raw, decode_thermal(raw))


def test_compressed_colour_is_read_in_the_layout_the_plugin_stored(msrs_pair):
    # JPEG and PNG hold colour as bgr8 whatever the encoding; a TIFF holds the image as it came.
    vi = msrs_pair[1]
    rgba = np.dstack([vi[:, :, ::-1], np.full(vi.shape[:2], 200, np.uint8)])
    for fmt, stored, extension in (('rgb8; jpeg compressed bgr8', vi, '.jpg'),
                                   ('rgba8; png compressed bgr8', vi, '.png'),
                                   ('rgb8; tiff compressed ', vi[:, :, ::-1], '.tiff'),
                                   ('rgba8; tiff compressed ', rgba, '.tiff')):
        out = decode_visible(RawCompressedImage(fmt, cv2.imencode(extension, stored)[1]))
        if extension == '.jpg':
            assert cv2.PSNR(out, vi) > 35, fmt
        else:
            np.testing.assert_array_equal(out, vi, err_msg=fmt)


def test_compressed_jpeg_of_a_16bit_image_is_scaled_back(msrs_pair):
    # The plugin's JPEG of a 16-bit image is its high byte (mono8); its subscriber multiplies
    # by 256, which keeps radiometric counts in range of a fixed normalization window.
    jpeg = cv2.imencode('.jpg', msrs_pair[0])[1]
    high = cv2.imdecode(jpeg, cv2.IMREAD_UNCHANGED).astype(np.float32)
    for encoding in ('mono16', '16UC1'):
        img = RawCompressedImage(f'{encoding}; jpeg compressed mono8', jpeg)
        np.testing.assert_array_equal(decode_thermal(img), high * 256)


@pytest.mark.parametrize('fmt, stored, problem', [
    ('bayer_rggb8; png compressed ', np.zeros((4, 6, 3), np.uint8),
     'decoded 3-channel uint8, but bayer_rggb8 is 1-channel uint8'),
    ('mono16; png compressed ', np.zeros((4, 6), np.uint8),
     'decoded 1-channel uint8, but mono16 is 1-channel uint16'),
    ('bgr8; png compressed bgr8', np.zeros((4, 6), np.uint8),
     'decoded 1-channel uint8, but bgr8 is 3-channel uint8'),
    ('nv21; png compressed ', np.zeros((4, 6), np.uint8), "unsupported encoding 'nv21'"),
    ('bgr16; png compressed bgr16', np.zeros((4, 6, 3), np.uint16),
     "unsupported encoding 'bgr16'"),
    ('rgb8; png compressed yuv420', np.zeros((4, 6, 3), np.uint8),
     "unsupported encoding 'yuv420'")])
def test_compressed_data_the_format_contradicts_is_refused(fmt, stored, problem):
    img = RawCompressedImage(fmt, cv2.imencode('.png', stored)[1])
    for decode in (decode_thermal, decode_visible):
        with pytest.raises(ImageDecodeError, match=f'compressed {fmt!r} image: {problem}'):
            decode(img)


def depth_message(fmt: str, png: bytes, params=(0.0, 0.0)) -> RawCompressedImage:
    """A CompressedImage as image_transport's compressed_depth plugin makes one: its 12-byte
    ConfigHeader (int32 format, float32 depthParam[2]) before the PNG."""
    return RawCompressedImage(fmt, struct.pack('<iff', 0, *params) + png)


def test_compressed_depth_16bit_is_the_png_after_its_header(msrs_pair):
    counts = msrs_pair[0].astype(np.uint16) * 64 + 5
    png = cv2.imencode('.png', counts)[1].tobytes()
    for fmt in ('16UC1; compressedDepth png', 'mono16; compressedDepth',  # older: png alone
                '16UC1; compressedDepth'):
        np.testing.assert_array_equal(decode_thermal(depth_message(fmt, png)),
                                      counts.astype(np.float32))


@pytest.mark.parametrize('codec', ['zstd', 'gzip'])
@pytest.mark.parametrize('encoding', ['mono16', '32FC1', 'bgr8', 'rgba8', 'yuv422',
                                      'bayer_rggb16'])
def test_the_zstd_transport_carries_the_raw_image(arrays, encoding, codec):
    # image_transport's zstd plugin: the raw image (big-endian and padded rows kept) behind a
    # 17-byte header, as a zstd frame or, in its earlier releases, a gzip stream.
    img = encode_image(arrays[encoding], encoding, bigendian=True, row_padding=3)
    message = RawCompressedImage('zstd', zstd_transport_data(img, codec))
    np.testing.assert_array_equal(decode_thermal(message), decode_thermal(img))
    if encoding != '32FC1':
        np.testing.assert_array_equal(decode_visible(message), decode_visible(img))


def test_a_bad_zstd_transport_message_is_refused_before_it_is_inflated(arrays):
    img = encode_image(arrays['mono16'], 'mono16')
    data = zstd_transport_data(img)

    def refused(data, match, max_pixels=MAX_PIXELS):
        with pytest.raises(ImageDecodeError, match=match):
            decode_visible(RawCompressedImage('zstd', data), max_pixels)

    refused(data[:10], 'no room for the 17-byte zstd transport header')
    refused(data[:23], 'cut short in its header')
    refused(data[:-20], 'decompressed to')
    for codec in ('gzip', 'zstd'):  # all the rows, but not the trailer that verifies them
        whole = zstd_transport_data(img, codec)
        refused(whole[:-2], 'ends before its trailer')
    refused(data[:23] + b'not compressed', 'neither a zstd frame nor a gzip stream')
    refused(data[:23] + b'\x28\xb5\x2f\xfd' + b'\xff' * 20, 'cannot decompress')
    unknown = encode_image(arrays['mono16'], 'mono16')
    refused(zstd_transport_data(RawImage(img.height, img.width, 'yuv420', img.step, 0,
                                         unknown.data)), "unsupported encoding 'yuv420'")
    # Sizes from the header, before anything is inflated: a small message of a huge image.
    refused(data, 'exceeds 100 pixels', max_pixels=100)
    bomb = struct.pack('<IIBII', 4096, 8, 0, 1 << 24, 6) + b'mono16' + data[23:]
    refused(bomb, r'step 16777216 exceeds the limit 4128')
    # One the header says is larger than its rows.
    refused(struct.pack('<IIBII', img.height, img.width, 0, img.step + 2, 6) + data[17:],
            'but its header gives step x height')
    # Rows far beyond what the header gives (64 MiB in 64 kB): inflated one byte past them.
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    flood = packer.compress(bytes(1 << 26)) + packer.flush()
    tracemalloc.start()
    try:
        refused(struct.pack('<IIBII', 1, 1, 0, 1, 5) + b'mono8' + flood,
                'decompressed to more than 1 bytes')
        assert tracemalloc.get_traced_memory()[1] < 1 << 22
    finally:
        tracemalloc.stop()


def test_compressed_depth_32fc1_is_its_quantized_inverse_depth():
    # The plugin's defaults (depth_quantization 100, depth_max 10 m): v = A / depth + B, 0 beyond.
    a = np.float32(100 * 101)
    b = np.float32(1 - a / 10)
    depth = np.linspace(0.5, 9.5, 48 * 64, dtype=np.float32).reshape(48, 64)
    depth[0, :5] = 12.0  # beyond depth_max: sent as 0, read as NaN
    quantized = np.where(depth < 10, a / depth + b, 0).astype(np.uint16)
    message = depth_message('32FC1; compressedDepth png', cv2.imencode('.png', quantized)[1]
                            .tobytes(), (a, b))
    decoded = decode_thermal(message)
    assert np.isnan(decoded[0, :5]).all() and not np.isnan(decoded[1:]).any()
    assert np.abs(decoded[1:] / depth[1:] - 1).max() < 1e-3  # the 16-bit quantization's error


@pytest.mark.parametrize('fmt, data, problem', [
    ('16UC1; compressedDepth rvl', bytes(40), "the compressedDepth codec 'rvl' is not supported"),
    ('bgr8; compressedDepth png', bytes(40), "compressedDepth of 'bgr8' is not supported"),
    ('16UC1; compressedDepth png', bytes(12), 'no room for the 12-byte compressedDepth header'),
    ('16UC1; compressedDepth png', bytes(40), 'cannot decode 28 bytes')])
def test_compressed_depth_that_cannot_be_read_is_refused_with_the_reason(fmt, data, problem):
    with pytest.raises(ImageDecodeError, match=problem):
        decode_thermal(RawCompressedImage(fmt, data))


# A 5 kB PNG that decodes to 40000x64: past MAX_SIDE, as a raw image of that size would be.
WIDE_PNG = cv2.imencode('.png', np.zeros((64, 40000), np.uint8))[1].tobytes()


def test_compressed_image_over_the_size_limit_is_refused_from_its_header():
    # The test process is set up as the commands' are (conftest): OpenCV knows the limits.
    with pytest.raises(ImageDecodeError, match="compressed 'png' image: its header exceeds the "
                                               f'limit of {MAX_SIDE} per side'):
        decode_visible(RawCompressedImage('png', WIDE_PNG))


def test_a_jpeg_over_max_pixels_is_refused_from_a_header_behind_metadata_or_fill_bytes():
    # Its frame marker behind a 64 kB APP2 segment (an EXIF thumbnail, say) and a fill byte;
    # the scan cut off, so only the header can tell its size: decoding would fail otherwise.
    jpeg = cv2.imencode('.jpg', np.zeros((1200, 1600, 3), np.uint8))[1].tobytes()
    frame = next(i for i in range(2, len(jpeg)) if jpeg[i] == 0xFF and jpeg[i + 1] == 0xC0)
    app2 = b'\xff\xe2' + (0xFFF0).to_bytes(2, 'big') + bytes(0xFFF0 - 2)
    cut = jpeg[:2] + app2 + jpeg[2:frame] + b'\xff' + jpeg[frame:frame + 19]
    with pytest.raises(ImageDecodeError, match='1600x1200 exceeds 1000000 pixels'):
        decode_visible(RawCompressedImage('jpeg', cut), max_pixels=1_000_000)
    with pytest.raises(ImageDecodeError, match='40000x64 exceeds 1000000 pixels'):
        decode_visible(RawCompressedImage('png', WIDE_PNG[:40]), max_pixels=1_000_000)


def test_compressed_image_over_the_size_limit_is_refused_where_opencv_has_no_limits():
    # A library user's process, which the package does not set up: refused once decoded.
    script = ('import sys; from s4fusion_ros.imaging.encodings import ImageDecodeError, '
              'RawCompressedImage, decode_visible\n'
              'try:\n    decode_visible(RawCompressedImage("png", sys.stdin.buffer.read()))\n'
              'except ImageDecodeError as error:\n    print(error)')
    env = {k: v for k, v in os.environ.items() if not k.startswith('OPENCV_IO_MAX_IMAGE')}
    done = subprocess.run([sys.executable, '-c', script], input=WIDE_PNG, capture_output=True,
                          env=env, timeout=120)
    assert done.stdout.decode().strip() == (
        f"compressed 'png' image: width 40000 exceeds the limit {MAX_SIDE}"), done.stderr


@pytest.mark.parametrize('data', [b'', b'not an image at all', b'\x89PNG\r\n\x1a\n' + bytes(40),
                                  b'\xff\xd8\xff\xe0' + bytes(100)])
def test_compressed_garbage_names_the_format(data):
    img = RawCompressedImage('jpeg', data)
    for decode in (decode_thermal, decode_visible):
        with pytest.raises(ImageDecodeError, match="compressed 'jpeg'"):
            decode(img)


def good(base='mono16', height=4, width=5, padding=0, **changes) -> RawImage:
    """Make a valid small ``base`` image, then apply ``changes`` to its fields."""
    fmt = FORMATS[base]
    step = width * fmt.channels * np.dtype(fmt.dtype).itemsize + padding
    fields = dict(height=height, width=width, encoding=base, step=step, is_bigendian=0)
    fields.update(changes)
    if 'data' not in fields:
        fields['data'] = bytes(height * step)
    return RawImage(**fields)


@pytest.mark.parametrize('img, message', [
    (good(data=bytes(39)), 'mono16 image: data is 39 bytes, height\\*step = 40'),
    (good(data=bytes(41)), 'data is 41 bytes'),
    (good(padding=2, data=bytes(47)), 'data is 47 bytes, height\\*step = 48'),
    (good(step=9), 'mono16 image: step 9 < width\\*bytes_per_pixel = 10'),
    (good('rgb8', step=14), 'rgb8 image: step 14 < width\\*bytes_per_pixel = 15'),
    (good(height=0), 'height must be positive'),
    (good(width=0, step=0, data=b''), 'width must be positive'),
    (good(width=-3, data=bytes(40)), 'width must be positive'),
    (good(height=1 << 31, data=b''), f'height {1 << 31} exceeds the limit {MAX_SIDE}'),
    (good(height=MAX_SIDE, width=MAX_SIDE, data=b''), f'exceeds {MAX_PIXELS} pixels'),
    (good(height=2.0, data=bytes(40)), 'height is not an integer'),
    (good(is_bigendian=None), 'is_bigendian is not an integer'),
    (good(encoding='32FC3'), "unsupported encoding '32FC3'"),
    (good(encoding='nv21'), "unsupported encoding 'nv21'"),
    (good(encoding=None), 'unsupported encoding None'),
    # Its own fault, so the node's per-fault log throttle keeps it apart from unknown encodings.
    (good(encoding=''), r'no encoding set \(the driver left it empty\)'),
    (good(data=[0] * 40), 'mono16 image: data is not a byte buffer'),
    (good(data=np.zeros(20, np.uint16)), 'data must be 1-D uint8'),
])
def test_malformed_images_raise_decode_error(img, message):
    for decode in (image_to_array, decode_thermal, decode_visible):
        with pytest.raises(ImageDecodeError, match=message):
            decode(img)


def test_an_image_of_exactly_max_pixels_is_read():
    img = good(height=4, width=5)
    assert image_to_array(img, max_pixels=20).shape == (4, 5)
    with pytest.raises(ImageDecodeError, match='5x4 exceeds 19 pixels'):
        image_to_array(img, max_pixels=19)


def test_the_size_limits_are_the_documented_32768_a_side_and_2_to_the_28_pixels():
    # docs/node.md states them; the tests above name them through the constants, so a changed
    # constant passed them all.
    for height, width in ((1, 32768), (16384, 16384)):  # at the limits: only the data is wrong
        with pytest.raises(ImageDecodeError, match='data is 0 bytes'):
            image_to_array(good(height=height, width=width, data=b''))
    with pytest.raises(ImageDecodeError, match='width 32769 exceeds the limit 32768'):
        image_to_array(good(height=1, width=32769, data=b''))
    with pytest.raises(ImageDecodeError, match='16385x16384 exceeds 268435456 pixels'):
        image_to_array(good(height=16384, width=16385, data=b''))


def test_decode_errors_reach_a_value_error_handler_and_name_the_fault():
    short = RawImage(data=np.zeros(3, np.uint8), height=2, width=2, encoding='mono8', step=2,
                     is_bigendian=0)
    with pytest.raises(ValueError, match=r'mono8 image: data is 3 bytes, height\*step = 4'):
        decode_thermal(short)
    unknown = RawImage(data=np.zeros(4, np.uint8), height=2, width=2, encoding='weird', step=2,
                       is_bigendian=0)
    with pytest.raises(ValueError, match="unsupported encoding 'weird'"):
        decode_visible(unknown)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(img=raw_images())
def test_malformed_raw_images_only_raise_decode_error(img):
    for decode, dtype, channels in ((decode_thermal, np.float32, ()),
                                    (decode_visible, np.uint8, (3,))):
        try:
            out = decode(img)
        except ImageDecodeError:
            continue
        assert out.dtype == dtype and out.shape == (img.height, img.width) + channels


@settings(max_examples=100, deadline=None)
@given(data=st.one_of(st.binary(max_size=200), st.builds(
    lambda tail: b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR' + tail, st.binary(max_size=80))))
def test_garbage_compressed_images_only_raise_decode_error(data):
    for decode, dtype, channels in ((decode_thermal, np.float32, ()),
                                    (decode_visible, np.uint8, (3,))):
        try:
            out = decode(RawCompressedImage('png', data))
        except ImageDecodeError:
            continue
        # Whatever decodes is an image of the promised type (any other exception fails).
        assert out.dtype == dtype and out.ndim == 2 + len(channels) and out.size > 0
        assert out.shape[2:] == channels


def test_encode_image_refuses_dishonest_arrays(msrs_pair):
    ir, vi = msrs_pair
    for array_, encoding in ((vi, 'mono8'), (ir, 'bgr8'), (ir, 'mono16'), (vi, 'rgba8'),
                             (ir.astype(np.float64), '32FC1'), (ir[:0], 'mono8'),
                             (ir[:, :0], 'mono8')):
        with pytest.raises(ValueError):
            encode_image(array_, encoding)
    with pytest.raises(ValueError, match='32FC3'):
        encode_image(vi, '32FC3')


def test_a_one_channel_image_with_a_channel_axis_encodes_as_gray(msrs_pair):
    ir = msrs_pair[0]
    img = encode_image(ir[:, :, None], 'mono8')
    assert (img.height, img.width, img.step) == (*ir.shape, ir.shape[1])
    np.testing.assert_array_equal(image_to_array(img), ir)


def test_color_round_trip_and_luminance(msrs_pair):
    vi = msrs_pair[1]
    y, cr, cb = color.bgr_to_ycrcb(vi)
    assert y.dtype == np.float32 and y.shape == vi.shape[:2]
    b, g, r = (vi[:, :, k].astype(np.float32) / 255 for k in range(3))
    np.testing.assert_allclose(y, 0.299 * r + 0.587 * g + 0.114 * b, atol=1e-6)
    np.testing.assert_allclose(color.bgr_to_gray(vi), y, atol=1e-6)
    assert 0.0 <= cr.min() and cr.max() <= 1.0 and 0.0 <= cb.min() and cb.max() <= 1.0
    np.testing.assert_array_equal(color.ycrcb_to_bgr(y, cr, cb), vi)


def test_color_fused_luminance_keeps_visible_chroma(msrs_pair):
    ir, vi = msrs_pair
    _, cr, cb = color.bgr_to_ycrcb(vi)
    fused_y = color.to_float(ir) * 1.3 - 0.1  # unclamped, as the model returns it
    out = color.ycrcb_to_bgr(fused_y, cr, cb)
    y = np.clip(fused_y, 0.0, 1.0)  # the inverse of BT.601 YCrCb with chroma offset 0.5
    expected = np.dstack([y + 1.773 * (cb - 0.5),
                          y - 0.714 * (cr - 0.5) - 0.344 * (cb - 0.5),
                          y + 1.403 * (cr - 0.5)])
    expected = np.clip(expected * 255, 0, 255)
    assert (fused_y > 1).any() and (fused_y < 0).any()
    assert np.abs(out - expected).max() <= 1.0


def test_gray_helpers():
    gray = np.array([[0.0, 0.5, 1.0], [-0.2, 1.7, np.nan]], np.float32)
    with np.errstate(invalid='raise'):  # NaN is made 0, not left to the platform's cast
        np.testing.assert_array_equal(color.to_uint8(gray), [[0, 128, 255], [0, 255, 0]])
    # to_uint8 rounds halves up, as MATLAB's uint8 (np.rint rounds them to even), and nothing
    # below a half (in float32, 0.49999997 + 0.5 rounds to 1).
    np.testing.assert_array_equal(color.round_half_up(
        np.array([0.5, 1.5, 2.5, 254.5, 0.49999997], np.float32)), [1, 2, 3, 255, 0])
    np.testing.assert_array_equal(color.to_float(np.array([0, 255], np.uint8)), [0.0, 1.0])


def test_a_16bit_image_is_value_over_65535_in_8_bits_rounded_half_up():
    # As training and s4fusion-fuse read it: v / 65535 * 255 = v / 257, never a tie, rounded
    # half up; not the high byte (v >> 8: a quarter of the values a level off), nor v / 65536 (127
    # values a level low).
    every = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    np.testing.assert_array_equal(color.as_uint8(every), (2 * every.astype(np.int64) + 257) // 514)
    eight = np.arange(256, dtype=np.uint8)
    assert color.as_uint8(eight) is eight


# A restart marker between every two MCUs: RST0 to RST7, then RST0 to RST2.
@pytest.mark.parametrize('flags', [[], [cv2.IMWRITE_JPEG_PROGRESSIVE, 1],
                                   [cv2.IMWRITE_JPEG_RST_INTERVAL, 1]],
                         ids=['baseline', 'progressive', 'restart markers'])
def test_a_jpeg_is_whole_as_libjpeg_reads_it_to_its_end_marker(flags):
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), np.uint8)
    jpeg = cv2.imencode('.jpg', image, flags)[1].tobytes()
    end = jpeg.rfind(b'\xff\xd9')
    table = jpeg.find(b'\xff\xdb')
    whole = {'as written': jpeg,
             # a motion photo: its video after the image (here more JPEG, scan markers and all)
             'data after it': jpeg + jpeg[:len(jpeg) // 2],
             'fill bytes before its end': jpeg[:end] + b'\xff' * 5000 + jpeg[end:],
             # libjpeg warns of "2 extraneous bytes before marker 0xdb" and decodes it
             'stray bytes between segments': jpeg[:table] + b'\x12\x34' + jpeg[table:]}
    for name, data in whole.items():
        assert jpeg_is_whole(data), name
    for cut in range(2, len(jpeg) - 1, 7):  # libjpeg fills the missing rows with gray
        assert not jpeg_is_whole(jpeg[:cut]), cut


def test_a_compressed_message_of_a_jpeg_cut_short_is_refused_as_such(msrs_pair):
    # A distro's OpenCV 4 decodes it with the missing rows gray; OpenCV 5 fails unexplained.
    jpeg = cv2.imencode('.jpg', msrs_pair[1])[1].tobytes()
    for cut in (len(jpeg) // 3, len(jpeg) - 2):
        with pytest.raises(ImageDecodeError, match=r"^compressed 'jpeg' image: a JPEG cut short"):
            decode_visible(RawCompressedImage('jpeg', jpeg[:cut]), MAX_PIXELS)
    assert decode_visible(RawCompressedImage('jpeg', jpeg), MAX_PIXELS) is not None
