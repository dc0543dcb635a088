"""sensor_msgs Image / CompressedImage fields <-> NumPy arrays; a bad message is a clear error.

The decoders take ``RawImage`` / ``RawCompressedImage`` or any object with the same attributes, so
rclpy messages (``data`` an ``array('B')`` or ``bytes``) and rosbags messages (``data`` a uint8
``np.ndarray``) go through the same code. Raw images are viewed in place (``np.frombuffer``); a
returned array may therefore be a read-only view of the message buffer.

Rules for the inputs (see docs/node.md, "Inputs"):

- thermal: mono8, 8UC1, mono16, 16UC1 (radiometric counts) and 32FC1 (temperature; NaN and +-inf
  come out as NaN) give float32 raw values. A colour encoding on the thermal topic (many pipelines
  publish gray as three equal channels) is converted to luminance and flagged ``from_color`` so the
  caller can warn once.
- visible: rgb8, bgr8, rgba8, bgra8, 8UC3 (as bgr8), 8UC4 (as bgra8) and mono8 give uint8 BGR.
  mono16 / 16UC1 are intensity over the full 16-bit range and are scaled by 255/65535 (as
  image_view does); 32FC1 is refused.
- camera-native colour (USB and machine-vision drivers): yuv422 / uyvy, yuv422_yuy2 / yuyv and
  bayer_{rggb,bggr,gbrg,grbg}{8,16} are converted to BGR first (16-bit Bayer then scaled as
  mono16), as cv_bridge converts them to bgr8.
- compressed (jpeg, png, whatever OpenCV decodes): read with IMREAD_UNCHANGED, so a 16-bit PNG
  stays 16-bit. A format that names the encoding, as image_transport's compressed plugin writes
  it, is read as its subscriber and cv_bridge read it: the layout is the stored encoding's (or
  the named one's), a Bayer mosaic is demosaiced as a raw one, and data that contradicts the
  format is refused. A bare format ('jpeg') leaves the layout to the decoded data: 1 channel
  gray, 3 channels BGR or 4 channels BGRA.
- compressedDepth (image_transport's compressed_depth plugin, the usual transport of 16-bit
  images): 16UC1 / mono16 as the PNG after its 12-byte header, 32FC1 as the plugin decodes its
  quantized inverse depth; its RVL codec is refused.
- zstd (image_transport's zstd plugin, lossless): the raw image it compressed, any encoding the
  raw path reads.
"""

import dataclasses
import operator
import zlib
from typing import Any, NamedTuple, Union

import cv2
import numpy as np

from .limits import MAX_PIXELS, MAX_SIDE, over_opencv_limits

Buffer = Union[bytes, bytearray, memoryview, np.ndarray]


class _Format(NamedTuple):
    dtype: str  # little-endian NumPy type; the byte order is set per message
    channels: int
    layout: str  # 'gray', 'rgb', 'bgr', 'rgba', 'bgra', or a camera-native one (_NATIVE_TO_BGR)


FORMATS = {
    'mono8': _Format('u1', 1, 'gray'),
    '8UC1': _Format('u1', 1, 'gray'),
    'mono16': _Format('<u2', 1, 'gray'),
    '16UC1': _Format('<u2', 1, 'gray'),
    '32FC1': _Format('<f4', 1, 'gray'),
    'rgb8': _Format('u1', 3, 'rgb'),
    'bgr8': _Format('u1', 3, 'bgr'),
    'rgba8': _Format('u1', 4, 'rgba'),
    'bgra8': _Format('u1', 4, 'bgra'),
    '8UC3': _Format('u1', 3, 'bgr'),  # no colour order: cv_bridge passes it through as bgr8
    '8UC4': _Format('u1', 4, 'bgra'),
    'yuv422': _Format('u1', 2, 'uyvy'),  # sensor_msgs' name for UYVY
    'uyvy': _Format('u1', 2, 'uyvy'),
    'yuv422_yuy2': _Format('u1', 2, 'yuyv'),
    'yuyv': _Format('u1', 2, 'yuyv'),
    **{f'bayer_{pattern}{bits}': _Format('u1' if bits == 8 else '<u2', 1, f'bayer_{pattern}')
       for pattern in ('rggb', 'bggr', 'gbrg', 'grbg') for bits in (8, 16)},
}

_TO_GRAY = {'rgb': cv2.COLOR_RGB2GRAY, 'bgr': cv2.COLOR_BGR2GRAY,
            'rgba': cv2.COLOR_RGBA2GRAY, 'bgra': cv2.COLOR_BGRA2GRAY}
_TO_BGR = {'gray': cv2.COLOR_GRAY2BGR, 'rgb': cv2.COLOR_RGB2BGR,
           'rgba': cv2.COLOR_RGBA2BGR, 'bgra': cv2.COLOR_BGRA2BGR}
_COMPRESSED_LAYOUTS = {1: 'gray', 3: 'bgr', 4: 'bgra'}
# Converted to BGR before anything else reads them. OpenCV names a Bayer pattern by the 2x2 block
# at the second row and column, so the sensor's RGGB is its BayerBG (checked in test_encodings).
_NATIVE_TO_BGR = {'uyvy': cv2.COLOR_YUV2BGR_UYVY, 'yuyv': cv2.COLOR_YUV2BGR_YUY2,
                  'bayer_rggb': cv2.COLOR_BayerBG2BGR, 'bayer_bggr': cv2.COLOR_BayerRG2BGR,
                  'bayer_gbrg': cv2.COLOR_BayerGR2BGR, 'bayer_grbg': cv2.COLOR_BayerGB2BGR}


class ImageDecodeError(ValueError):
    """A message that cannot be turned into an image; the text names the encoding and the fault."""


# eq=False: data may be an ndarray, whose == is element-wise.
@dataclasses.dataclass(frozen=True, eq=False)
class RawImage:
    """The fields of sensor_msgs/Image (header aside)."""

    height: int
    width: int
    encoding: str
    step: int
    is_bigendian: int
    data: Buffer


@dataclasses.dataclass(frozen=True, eq=False)
class RawCompressedImage:
    """The fields of sensor_msgs/CompressedImage (header aside)."""

    format: str
    data: Buffer


class ThermalDecode(NamedTuple):
    """Raw thermal values, whether they were made from a colour image, and the image's name for
    messages (its encoding, or its compressed format)."""

    raw: np.ndarray
    from_color: bool
    name: str


def _byte_view(data: Any, what: str) -> np.ndarray:
    """Return ``data`` as a 1-D uint8 array without copying where the buffer allows."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 1:
            raise ImageDecodeError(
                f'{what}: data must be 1-D uint8, got {data.dtype} {data.shape}')
        return np.ascontiguousarray(data)  # a slice of another array: the views below need one
    try:
        return np.frombuffer(data, np.uint8)
    except (TypeError, ValueError, BufferError) as exc:
        raise ImageDecodeError(
            f'{what}: data is not a byte buffer ({type(data).__name__})') from exc


def _dimension(value: Any, name: str, encoding: str, limit: int) -> int:
    """Validate one integer header field (height, width, step) and return it."""
    try:
        number = operator.index(value)
    except TypeError:
        raise ImageDecodeError(f'{encoding} image: {name} is not an integer: {value!r}') from None
    if number <= 0:
        raise ImageDecodeError(f'{encoding} image: {name} must be positive, got {number}')
    if number > limit:
        raise ImageDecodeError(f'{encoding} image: {name} {number} exceeds the limit {limit}')
    return number


def _check_pixels(width: int, height: int, name: str, limit: int) -> None:
    if width * height > limit:
        # The limit is the pipeline's max_input_pixels parameter: named, for who would raise it.
        raise ImageDecodeError(f'{name} image: {width}x{height} exceeds {limit} pixels '
                               f'(max_input_pixels)')


def _flag(value: Any, encoding: str) -> bool:
    """Validate is_bigendian (a uint8 in the message) and return it as a bool."""
    try:
        return operator.index(value) != 0
    except TypeError:
        pass
    raise ImageDecodeError(f'{encoding} image: is_bigendian is not an integer: {value!r}')


def _encoding_of(img: Any) -> str:
    """Return the encoding name if it is one this package reads."""
    encoding = getattr(img, 'encoding', None)
    if encoding == '':  # its own fault (the driver never set it), logged apart from the others
        raise ImageDecodeError(f'no encoding set (the driver left it empty); known: '
                               f'{sorted(FORMATS)}')
    if not isinstance(encoding, str) or encoding not in FORMATS:
        raise ImageDecodeError(f'unsupported encoding {encoding!r}; known: {sorted(FORMATS)}')
    return encoding


def image_to_array(img: Any, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """View a raw image as (H, W) or (H, W, C) in native byte order (no copy unless swapped, or
    its rows are not a whole number of elements apart); larger than `max_pixels` (width x height,
    checked from the header) is an error."""
    encoding = _encoding_of(img)
    fmt = FORMATS[encoding]
    height = _dimension(img.height, 'height', encoding, MAX_SIDE)
    width = _dimension(img.width, 'width', encoding, MAX_SIDE)
    _check_pixels(width, height, encoding, max_pixels)
    dtype = np.dtype(fmt.dtype)
    if _flag(img.is_bigendian, encoding) and dtype.itemsize > 1:
        dtype = dtype.newbyteorder('>')
    row_bytes = width * fmt.channels * dtype.itemsize
    step = _dimension(img.step, 'step', encoding, 1 << 62)
    if step < row_bytes:
        raise ImageDecodeError(
            f'{encoding} image: step {step} < width*bytes_per_pixel = {row_bytes}')
    data = _byte_view(img.data, f'{encoding} image')
    if data.size != height * step:
        raise ImageDecodeError(
            f'{encoding} image: data is {data.size} bytes, height*step = {height * step}')
    # Strided view: padded rows are skipped, alignment does not matter.
    array = np.ndarray((height, width, fmt.channels), dtype, buffer=data,
                       strides=(step, fmt.channels * dtype.itemsize, dtype.itemsize))
    # OpenCV misreads a view whose rows start between elements (a 16-bit image with an odd
    # step): such rows are packed by the copy, as swapped bytes are.
    if not dtype.isnative or step % dtype.itemsize:
        array = array.astype(dtype.newbyteorder('='))
    return array[:, :, 0] if fmt.channels == 1 else array


_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
# JPEG start-of-frame markers (baseline, progressive, lossless, ...); C4, C8 and CC are not frames.
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and the restart markers
# Markers a header walk takes before leaving the size to the decoder: a camera's JPEG has a few
# dozen before its frame, a damaged one could hold millions.
_JPEG_MARKERS_WALKED = 1 << 12


def _header_size(data) -> tuple[int, int] | None:
    """(width, height) from a PNG's or JPEG's header (`data`: bytes or a memoryview), None for
    other formats or a header cut short or damaged. Read by hand: OpenCV's Python API has no
    header-only read, and the point is to refuse a huge image before decoding allocates it. A
    JPEG's frame marker can follow large metadata (an EXIF thumbnail): the walk jumps from
    segment to segment over the whole file."""
    if bytes(data[:8]) == _PNG_SIGNATURE and bytes(data[12:16]) == b'IHDR' and len(data) >= 24:
        return int.from_bytes(data[16:20], 'big'), int.from_bytes(data[20:24], 'big')
    if bytes(data[:2]) != b'\xff\xd8':
        return None
    data = bytes(data)  # the walk searches it
    for marker, position in _jpeg_markers(data, _JPEG_MARKERS_WALKED):
        if marker in _JPEG_FRAMES:  # length, precision, height, width
            if position + 9 > len(data):
                return None
            return (int.from_bytes(data[position + 7:position + 9], 'big'),
                    int.from_bytes(data[position + 5:position + 7], 'big'))
        if marker in (0xD9, 0xDA):  # end of image, or the scan, before any frame
            return None
    return None


def jpeg_is_whole(data: bytes) -> bool:
    """Whether a JPEG (`data` from its start-of-image marker) reaches its end-of-image marker.
    libjpeg decodes one cut short with its missing rows gray and only warns. What follows the
    end marker (a motion photo's video) is not the image's."""
    return any(marker == 0xD9 for marker, _ in _jpeg_markers(data))


def check_whole_jpeg(data: np.ndarray, name: str) -> None:
    """ImageDecodeError (`name`: what is refused) for a JPEG (uint8 `data`) cut short, before
    OpenCV decodes it: OpenCV 5 refuses one, a distro's OpenCV 4 returns it with the missing rows
    gray."""
    if data[:2].tobytes() == b'\xff\xd8' and not jpeg_is_whole(data.tobytes()):
        raise ImageDecodeError(f'{name}: a JPEG cut short (no end-of-image marker after its '
                               'last scan)')


def _jpeg_markers(data: bytes, limit: int | None = None):
    """Yield (marker, position) of a JPEG's markers after its start-of-image, segment by segment,
    each scan's coded data skipped. Bytes between segments that start no marker are skipped,
    as libjpeg does (it warns of extraneous bytes and reads on), and so are fill bytes. Ends at
    the end-of-image marker, at the data's end, or after `limit` markers."""
    position, count = 2, 0
    while limit is None or count < limit:
        position = data.find(b'\xff', position)
        if position < 0 or position + 1 >= len(data):
            return
        marker = data[position + 1]
        if marker in (0xFF, 0x00):  # a fill byte before the marker, or no marker
            position += 1
            continue
        count += 1
        yield marker, position
        if marker == 0xD9:
            return
        if marker in _JPEG_STANDALONE:  # no length field
            position += 2
            continue
        position += 2 + int.from_bytes(data[position + 2:position + 4], 'big')
        if marker == 0xDA:
            position = _scan_end(data, position)


def _scan_end(data: bytes, position: int) -> int:
    """Where the coded data of a scan starting at `position` ends: the first marker in it, a
    0xFF followed by neither 0x00 (a stuffed 0xFF byte) nor a restart marker; the data's end
    if none."""
    while (position := data.find(b'\xff', position)) >= 0 and position + 1 < len(data):
        following = data[position + 1]
        if following != 0x00 and following not in _JPEG_STANDALONE:
            return position
        position += 2
    return len(data)


# compressed_depth_image_transport's messages: format '<encoding>; compressedDepth[ png| rvl]'
# (no codec: png), data a 12-byte ConfigHeader (int32 format, float32 depthParam[2], little
# endian) before the codec's stream. 16-bit images are the PNG as they were; 32FC1 depth is
# quantized inverse depth v, read back as depthParam[0] / (v - depthParam[1]) (0: NaN).
_DEPTH_HEADER_BYTES = 12
_DEPTH_ENCODINGS = ('16UC1', 'mono16', '32FC1')


def _compressed_depth(fmt: str) -> tuple[str, str] | None:
    """(encoding, codec) of a compressedDepth format string, None for other formats."""
    encoding, _, rest = fmt.partition(';')
    words = rest.split()
    if 'compressedDepth' not in words:
        return None
    codec = words[words.index('compressedDepth') + 1:][:1]
    return encoding.strip(), codec[0] if codec else 'png'


def _depth_png(data: np.ndarray, depth: tuple[str, str], name: str) -> tuple[np.ndarray, tuple]:
    """The PNG stream of a compressedDepth message and its depthParam; RVL, other encodings and
    a message without a header are refused."""
    encoding, codec = depth
    if codec != 'png':
        raise ImageDecodeError(f'{name} image: the compressedDepth codec {codec!r} is not '
                               f'supported (png is)')
    if encoding not in _DEPTH_ENCODINGS:
        raise ImageDecodeError(f'{name} image: compressedDepth of {encoding!r} is not '
                               f'supported ({", ".join(_DEPTH_ENCODINGS)} are)')
    if data.size <= _DEPTH_HEADER_BYTES:
        raise ImageDecodeError(f'{name} image: {data.size} bytes, no room for the '
                               f'{_DEPTH_HEADER_BYTES}-byte compressedDepth header and an image')
    params = tuple(data[4:_DEPTH_HEADER_BYTES].view('<f4').astype(float))
    return data[_DEPTH_HEADER_BYTES:], params


def _inverse_depth(quantized: np.ndarray, params: tuple, name: str) -> np.ndarray:
    """32FC1 depth from the plugin's 16-bit quantized inverse depth (0: no depth, NaN)."""
    if quantized.dtype != np.uint16 or quantized.ndim != 2:
        raise ImageDecodeError(f'{name} image: expected a 16-bit gray PNG of inverse depth, got '
                               f'{quantized.dtype} {quantized.shape}')
    with np.errstate(divide='ignore', invalid='ignore'):
        depth = np.float32(params[0]) / (quantized.astype(np.float32) - np.float32(params[1]))
    depth[quantized == 0] = np.nan
    return depth


# zstd_image_transport's messages: format 'zstd', data a 17-byte little-endian header (uint32
# height, uint32 width, uint8 is_bigendian, uint32 step, uint32 length of the encoding), the
# encoding, then the image's rows compressed: a gzip stream in its releases so far (its zlib
# wrapper), a zstd frame from its newest sources (its zstd wrapper), told apart by their magic
# bytes.
ZSTD_FORMAT = 'zstd'
_ZSTD_HEADER = np.dtype([('height', '<u4'), ('width', '<u4'), ('is_bigendian', 'u1'),
                         ('step', '<u4'), ('encoding_length', '<u4')])  # packed: 17 bytes
_ZSTD_FRAME_MAGIC = b'\x28\xb5\x2f\xfd'
_GZIP_MAGIC = b'\x1f\x8b'


def _zstd_fields(data: np.ndarray, name: str) -> tuple[np.void, str, np.ndarray]:
    """The header, encoding and compressed payload of a zstd transport message."""
    if data.size < _ZSTD_HEADER.itemsize:
        raise ImageDecodeError(f'{name} image: {data.size} bytes, no room for the '
                               f'{_ZSTD_HEADER.itemsize}-byte zstd transport header')
    header = data[:_ZSTD_HEADER.itemsize].view(_ZSTD_HEADER)[0]
    start = _ZSTD_HEADER.itemsize + int(header['encoding_length'])
    if data.size <= start:
        raise ImageDecodeError(f'{name} image: {data.size} bytes, cut short in its header '
                               f'(encoding of {int(header["encoding_length"])} bytes) or with '
                               'no image after it')
    encoding = bytes(data[_ZSTD_HEADER.itemsize:start]).decode('ascii', errors='replace')
    return header, encoding, data[start:]


def zstd_encoding(data: Buffer) -> str:
    """The source encoding a zstd transport message carries in its header ('' where it is too
    short to tell)."""
    try:
        return _zstd_fields(_byte_view(data, 'zstd'), 'zstd')[1]
    except ImageDecodeError:
        return ''


def _zstd_module(name: str):
    """Python 3.14's compression.zstd, else its backport (installed with rosbags)."""
    try:
        from compression import zstd
    except ImportError:
        try:
            from backports import zstd
        except ImportError:
            raise ImageDecodeError(f'{name} image: a zstd frame needs Python 3.14 or the '
                                   'backports.zstd package (pip install backports.zstd)') from None
    return zstd


def _decompressed(payload: np.ndarray, size: int, name: str) -> bytes:
    """The payload's `size` bytes, inflated from a zstd frame or a gzip stream; more or fewer
    is an error, found without inflating more than one byte past `size`."""
    head, errors = bytes(payload[:4]), (zlib.error,)
    if head.startswith(_ZSTD_FRAME_MAGIC):
        zstd = _zstd_module(name)
        inflater, errors = zstd.ZstdDecompressor(), (zstd.ZstdError,)
    elif head.startswith(_GZIP_MAGIC):
        inflater = zlib.decompressobj(wbits=31)
    else:
        raise ImageDecodeError(f'{name} image: its data is neither a zstd frame nor a gzip '
                               f'stream (starts {head.hex()})')
    try:
        raw = inflater.decompress(payload.tobytes(), size + 1)
    except errors as exc:
        raise ImageDecodeError(f'{name} image: cannot decompress ({exc})') from exc
    if len(raw) != size:
        got = f'more than {size}' if len(raw) > size else str(len(raw))
        raise ImageDecodeError(f'{name} image: decompressed to {got} bytes, but its header '
                               f'gives step x height = {size}')
    if not inflater.eof:  # the trailer (gzip's CRC, a zstd checksum) is what verifies the rows
        raise ImageDecodeError(f'{name} image: its stream ends before its trailer (cut short)')
    return raw


def _zstd_image(data: np.ndarray, max_pixels: int) -> RawImage:
    """The raw image a zstd transport message carries; one over `max_pixels` is refused from its
    header, before anything is decompressed."""
    name = f'compressed {ZSTD_FORMAT!r}'
    header, encoding, payload = _zstd_fields(data, name)
    if encoding not in FORMATS:
        raise ImageDecodeError(f'{name} image: unsupported encoding {encoding!r}; known: '
                               f'{sorted(FORMATS)}')
    height = _dimension(int(header['height']), 'height', name, MAX_SIDE)
    width = _dimension(int(header['width']), 'width', name, MAX_SIDE)
    _check_pixels(width, height, name, max_pixels)
    fmt = FORMATS[encoding]
    row_bytes = width * fmt.channels * np.dtype(fmt.dtype).itemsize
    # Rows padded for alignment, not a step that would inflate a small message to gigabytes.
    step = _dimension(int(header['step']), 'step', name, 2 * row_bytes + 4096)
    raw = _decompressed(payload, step * height, name)
    return RawImage(height, width, encoding, step, bool(header['is_bigendian']),
                    np.frombuffer(raw, np.uint8))


# compressed_image_transport's messages: format '<encoding>; <codec> compressed <stored>'. The
# image is stored as <stored> (bgr8 for colour, mono8 for the rest in a JPEG) or, where that is
# empty, as <encoding> itself (a PNG of gray, 16-bit or a Bayer mosaic, a TIFF of anything; a
# compressedDepth image too, once unpacked).
def format_encoding(fmt: str) -> str:
    """The source encoding a CompressedImage format names ('bgr8' of 'bgr8; jpeg compressed
    bgr8', as image_transport writes it); '' where it names none ('jpeg')."""
    encoding, separator, _ = fmt.partition(';')
    return encoding.strip() if separator else ''


def decoded_encoding(img: Any) -> str:
    """The encoding the data of a CompressedImage in a bare format ('jpeg', 'png', naming none)
    decodes as (mono8, mono16, bgr8 or bgra8); '' for data that does not decode."""
    try:
        array, layout, _ = _decode_compressed(img, MAX_PIXELS)
    except ImageDecodeError:
        return ''
    return next((name for name, fmt in FORMATS.items() if fmt.layout == layout
                 and np.dtype(fmt.dtype).newbyteorder('=') == array.dtype), '')


def _transported(array: np.ndarray, fmt: str, name: str) -> tuple[np.ndarray, str]:
    """The decoded image of a format that names its encoding, and its layout; an encoding the
    raw path refuses, or data of another type or channel count than stored, is refused."""
    encoding, words = format_encoding(fmt), fmt.partition(';')[2].split()
    after = words[words.index('compressed') + 1:] if 'compressed' in words else []
    stored = after[0] if after else encoding
    for known in (encoding, stored):
        if known not in FORMATS:
            raise ImageDecodeError(f'{name} image: unsupported encoding {known!r}; known: '
                                   f'{sorted(FORMATS)}')
    expected = FORMATS[stored]
    channels = 1 if array.ndim == 2 else array.shape[2]
    if (channels != expected.channels
            or array.dtype != np.dtype(expected.dtype).newbyteorder('=')):
        raise ImageDecodeError(f'{name} image: decoded {channels}-channel {array.dtype}, but '
                               f'{stored} is {expected.channels}-channel '
                               f'{np.dtype(expected.dtype).name}')
    # A JPEG of a 16-bit image holds its high byte: the plugin's subscriber scales it back.
    if array.dtype == np.uint8 and np.dtype(FORMATS[encoding].dtype).itemsize == 2:
        array = array.astype(np.uint16) << 8
    return array, expected.layout


def _decode_compressed(img: Any, max_pixels: int) -> tuple[np.ndarray, str, str]:
    """Decode a CompressedImage to (array, layout, a name for messages); a PNG or JPEG over
    `max_pixels` is refused from its header."""
    name = f'compressed {getattr(img, "format", None)!r}'
    data = _byte_view(img.data, name)
    if data.size == 0:
        raise ImageDecodeError(f'{name} image: no data')
    depth = _compressed_depth(img.format) if isinstance(img.format, str) else None
    if depth is not None:
        data, params = _depth_png(data, depth, name)
    size = _header_size(memoryview(data))
    if size is not None:
        _check_pixels(*size, name, max_pixels)
    check_whole_jpeg(data, f'{name} image')
    try:
        array = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        if over_opencv_limits(exc):
            raise ImageDecodeError(f'{name} image: its header exceeds the limit of {MAX_SIDE} '
                                   f'per side or {MAX_PIXELS} pixels') from exc
        raise ImageDecodeError(f'{name} image: cannot decode ({exc.err})') from exc
    if array is None or array.size == 0:
        raise ImageDecodeError(f'{name} image: cannot decode {data.size} bytes')
    # Checked after decoding where OpenCV was not given the limits (a library user's process).
    for side, size in (('height', array.shape[0]), ('width', array.shape[1])):
        _dimension(size, side, name, MAX_SIDE)
    _check_pixels(array.shape[1], array.shape[0], name, max_pixels)
    if depth is not None and depth[0] == '32FC1':
        array = _inverse_depth(array, params, name)
    if isinstance(img.format, str) and ';' in img.format:
        return (*_transported(array, img.format, name), name)
    channels = 1 if array.ndim == 2 else array.shape[2]
    if channels not in _COMPRESSED_LAYOUTS or array.dtype not in (np.uint8, np.uint16,
                                                                  np.float32):
        raise ImageDecodeError(f'{name} image: unsupported {channels}-channel {array.dtype}')
    return array, _COMPRESSED_LAYOUTS[channels], name


def _decode_any(img: Any, max_pixels: int) -> tuple[np.ndarray, str, str]:
    """Decode a raw or compressed image to (array, layout, a name for messages); an image
    over `max_pixels` is refused (see image_to_array and _decode_compressed for when)."""
    compressed = hasattr(img, 'format') and not hasattr(img, 'encoding')
    if compressed and img.format == ZSTD_FORMAT:  # a raw image inside: read as one
        img, compressed = _zstd_image(_byte_view(img.data, f'compressed {ZSTD_FORMAT!r}'),
                                      max_pixels), False
    if compressed:
        array, layout, name = _decode_compressed(img, max_pixels)
    else:
        array = image_to_array(img, max_pixels)
        layout, name = FORMATS[img.encoding].layout, img.encoding
    if layout in _NATIVE_TO_BGR:
        return _native_to_bgr(array, layout, name), 'bgr', name
    return array, layout, name


def _native_to_bgr(array: np.ndarray, layout: str, name: str) -> np.ndarray:
    """Convert a YUV 4:2:2 or Bayer image to BGR of its own depth."""
    height, width = array.shape[:2]
    if layout in ('uyvy', 'yuyv') and width % 2:
        raise ImageDecodeError(f'{name} image: width {width} is odd; 4:2:2 shares each '
                               f'colour sample between two pixels')
    if layout.startswith('bayer') and min(height, width) < 2:
        raise ImageDecodeError(f'{name} image: {width}x{height} is smaller than one 2x2 '
                               f'Bayer block')
    return cv2.cvtColor(np.ascontiguousarray(array), _NATIVE_TO_BGR[layout])


def decode_thermal_info(img: Any, max_pixels: int = MAX_PIXELS) -> ThermalDecode:
    """Decode a thermal image to float32 (H, W) raw values, telling whether it was colour."""
    array, layout, name = _decode_any(img, max_pixels)
    if layout != 'gray':
        if array.dtype == np.float32:
            raise ImageDecodeError(f'{name} image: float colour is not a thermal image')
        return ThermalDecode(cv2.cvtColor(array.astype(np.float32), _TO_GRAY[layout]), True,
                             name)
    raw = np.array(array, dtype=np.float32)
    if array.dtype == np.float32:
        raw[np.isinf(raw)] = np.nan  # the normalizer excludes NaN from its statistics
    return ThermalDecode(raw, False, name)


def decode_thermal(img: Any) -> np.ndarray:
    """Decode a thermal image to float32 (H, W) raw values (counts or temperature, NaN kept)."""
    return decode_thermal_info(img).raw


def decode_visible(img: Any, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode a visible image to uint8 (H, W, 3) BGR."""
    array, layout, name = _decode_any(img, max_pixels)
    if array.dtype == np.float32:
        raise ImageDecodeError(f'{name} image: float data is not a visible image')
    if array.dtype == np.uint16:
        array = cv2.convertScaleAbs(array, alpha=255.0 / 65535.0)
    return array if layout == 'bgr' else cv2.cvtColor(array, _TO_BGR[layout])


def compress_transport(array: np.ndarray, encoding: str, codec: str, jpeg_quality: int = 95,
                       png_level: int = 3) -> tuple[str, bytes]:
    """The CompressedImage format and data image_transport's compressed publisher makes of an
    8-bit image in `encoding` (bgr8, rgb8 or mono8): colour stored as bgr8 (named after
    'compressed'), gray as it is (nothing named), so that its subscriber, cv_bridge and
    _transported read it back as that encoding."""
    stored = '' if encoding == 'mono8' else 'bgr8'
    if encoding == 'rgb8':
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    suffix, params = (('.jpg', [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]) if codec == 'jpeg'
                      else ('.png', [cv2.IMWRITE_PNG_COMPRESSION, png_level]))
    ok, data = cv2.imencode(suffix, np.ascontiguousarray(array), params)
    if not ok:
        raise ValueError(f'OpenCV could not encode a {encoding} image as {codec}')
    return f'{encoding}; {codec} compressed {stored}', data.tobytes()


def encode_image(array: np.ndarray, encoding: str, *, bigendian: bool = False,
                 row_padding: int = 0) -> RawImage:
    """Pack an array as a RawImage with an honest encoding (optionally big-endian / padded rows).

    The array must already have the encoding's dtype and channel count; nothing is converted.
    """
    if encoding not in FORMATS:
        raise ValueError(f'cannot encode {encoding!r}; known: {sorted(FORMATS)}')
    fmt = FORMATS[encoding]
    array = np.asarray(array)
    if array.ndim == 3 and fmt.channels == 1 and array.shape[2] == 1:
        array = array[:, :, 0]
    expected_ndim = 2 if fmt.channels == 1 else 3
    dtype = np.dtype(fmt.dtype)
    if (array.ndim != expected_ndim or (fmt.channels > 1 and array.shape[2] != fmt.channels)
            or array.dtype.kind != dtype.kind or array.dtype.itemsize != dtype.itemsize):
        raise ValueError(f'{encoding} needs {fmt.channels}-channel {dtype.name}, got '
                         f'{array.dtype} {array.shape}')
    if array.size == 0 or row_padding < 0:
        raise ValueError(f'cannot encode {array.shape} with row_padding {row_padding}')
    big = bigendian and dtype.itemsize > 1
    height, width = array.shape[:2]
    # Contiguous: a view (a rotated or sliced image) has no rows of bytes to view as uint8.
    rows = np.ascontiguousarray(array, dtype.newbyteorder('>' if big else '<'))
    rows = rows.reshape(height, -1).view(np.uint8)
    step = rows.shape[1] + row_padding
    if row_padding:
        rows = np.concatenate([rows, np.zeros((height, row_padding), np.uint8)], axis=1)
    return RawImage(height, width, encoding, step, int(big), rows.tobytes())
