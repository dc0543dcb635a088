"""Reading and writing rosbag2 image bags with rosbags, without ROS.

Bags are what `ros2 bag record` writes: a directory with metadata.yaml and sqlite3 (.db3) or MCAP
storage; a bare .db3 / .mcap file is read too. Every reading fault is a BagError naming the file
(and the topic where one is involved). A bag is written under a temporary name beside its final
path and renamed into place only when complete, so an interruption, a crash or a full disk never
leaves a half-written bag under the final name; what a killed writer left there is removed by the
next bag written to that name.
"""

import collections
import contextlib
import dataclasses
import fcntl
import glob
import heapq
import io
import os
import pathlib
import re
import secrets
import shutil
import sqlite3
import struct
import tempfile
from collections.abc import Iterable, Iterator
from functools import cache, partial

import lz4.frame
import numpy as np
import yaml
from rosbags.interfaces import (Connection, ConnectionExtRosbag2, Qos, QosDurability, QosHistory,
                                QosLiveliness, QosReliability, QosTime)
from rosbags.rosbag2 import (CompressionFormat, CompressionMode, Reader, ReaderError,
                             StoragePlugin, Writer, WriterError)
# The storages themselves, for reading an MCAP file cut off by a crash (_McapReader), sqlite3
# bags under any path (_UriPath); and with the reader, compressed data inflated within bounds.
from rosbags.rosbag2 import reader as rosbag2_reader
from rosbags.rosbag2 import storage_mcap
from rosbags.rosbag2.reader import DirectoryReader
from rosbags.rosbag2.storage_mcap import ChunkInfo, McapReader, decompress, msgsrc, zstd
from rosbags.rosbag2.storage_sqlite3 import Sqlite3Reader, Sqlite3Writer
from rosbags.typesys import Stores, get_typestore

from .camera_info import CAMERA_INFO
from .cli import TimeWindow
from .files import sync_to_disk, sync_tree
from .imaging.encodings import (FORMATS, ZSTD_FORMAT, RawImage, decoded_encoding,
                                format_encoding, zstd_encoding)
from .imaging.limits import MAX_PIXELS
from .messages import ns_to_sec_nanosec
from .settings import OUTPUT_TOPIC_PATTERN, yaml_fault

IMAGE = 'sensor_msgs/msg/Image'
COMPRESSED_IMAGE = 'sensor_msgs/msg/CompressedImage'
IMAGE_TYPES = (IMAGE, COMPRESSED_IMAGE)
STORAGES = ('mcap', 'sqlite3')
BAG_VERSION = 9  # what Jazzy and Kilted write
# What writing a bag raises on a full disk, a file size limit or an unwritable folder.
WRITE_ERRORS = (OSError, sqlite3.Error, WriterError)
# create_bag builds a bag in a hidden sibling .NAME.<this many random bytes, in hex>.partial
STAGING_HEX_BYTES = 4

# Encodings that only a thermal camera publishes, and colour that only a visible camera does;
# 8-bit gray is thermal only on a topic named like one (many thermal drivers publish mono8 AGC).
THERMAL_ENCODINGS = frozenset({'mono16', '16UC1', '32FC1'})
COLOR_ENCODINGS = frozenset(name for name, fmt in FORMATS.items() if fmt.layout != 'gray')
GRAY8_ENCODINGS = frozenset({'mono8', '8UC1'})
# Words only thermal cameras' topics are named with, and those near-infrared ones share.
THERMAL_WORDS = ('thermal', 'lwir', 'mwir', 'flir', 'boson', 'lepton')
THERMAL_NAME = re.compile(rf'(^|[^a-z])({"|".join(THERMAL_WORDS)}|infrared|ir)([^a-z]|$)',
                          re.IGNORECASE)
# Depth cameras publish 16UC1 (mm) and 32FC1 (m) too, as do stereo disparity images: a topic
# named so, and not named like a thermal one, is not taken for the thermal camera (the
# compressedDepth transport aside, which 16-bit thermal cores use as well).
DEPTH_NAME = re.compile(r'(^|[^a-z])(depth|disparity)([^a-z]|$)', re.IGNORECASE)
# A depth camera's near-infrared image (OpenNI and Orbbec drivers' camera/ir/image, Azure
# Kinect's ir/image_raw: mono16 or 16UC1) looks like a 16-bit thermal core named 'ir': one in a
# namespace named just so (ir, nir, ir1, left_ir) beside one named depth* is not taken for the
# thermal camera.
NEAR_INFRARED_SEGMENT = re.compile(r'((left|right)_)?n?ir\d*', re.IGNORECASE)
DEPTH_SEGMENT = re.compile(r'depth', re.IGNORECASE)
THERMAL_ONLY_NAME = re.compile(rf'(^|[^a-z])({"|".join(THERMAL_WORDS)})([^a-z]|$)',
                               re.IGNORECASE)
# The fusion node's own outputs, as a recording of the live system holds them (in any
# namespace, raw or /compressed): neither a camera to fuse nor a topic to replay by default.
NODE_OUTPUT = re.compile(rf'{OUTPUT_TOPIC_PATTERN}(/compressed)?$')

_NO_TIME = QosTime(sec=0, nsec=0)


def output_qos(reliability: str = 'reliable', depth: int = 5) -> Qos:
    """The QoS the node offers on its outputs (qos.output.*: keep last `depth`, volatile), as a
    bag records it for a replay to offer."""
    return Qos(QosHistory.KEEP_LAST, depth, QosReliability[reliability.upper()],
               QosDurability.VOLATILE, _NO_TIME, _NO_TIME, QosLiveliness.AUTOMATIC, _NO_TIME,
               False)


def output_qos_of(values: dict) -> Qos:
    """The output topics' QoS from the node's parameter values (qos.output.*)."""
    return output_qos(values['qos.output.reliability'], values['qos.output.depth'])


# The node's default output QoS (reliable, keep last 5, volatile).
RELIABLE_QOS = output_qos()


class BagError(Exception):
    """A bag that cannot be read or written; the message names the file (and topic)."""


BAG_SUFFIXES = ('.mcap', '.db3')  # of the storage files rosbag2 writes (perhaps then .zstd)


def bag_files(folder: pathlib.Path) -> list[str]:
    """The names of the storage files in `folder`, sorted."""
    return sorted(entry.name for entry in folder.iterdir() if entry.is_file()
                  and entry.name.removesuffix('.zstd').endswith(BAG_SUFFIXES))


def is_unindexed_recording(folder: pathlib.Path) -> bool:
    """Whether `folder`, without its metadata.yaml, holds a recording still running or cut off:
    its bag files all named as rosbag2 writers name a recording's, its first among them
    (DIR_0.mcap, DIR_1.mcap, ..., or DIR.db3; each perhaps .zstd)."""
    suffixes = '|'.join(map(re.escape, BAG_SUFFIXES))
    split = re.compile(rf'{re.escape(folder.name)}(_\d+)?({suffixes})(\.zstd)?')
    first = re.compile(rf'{re.escape(folder.name)}(_0)?({suffixes})(\.zstd)?')
    names = bag_files(folder)
    return (any(first.fullmatch(name) for name in names)
            and all(split.fullmatch(name) for name in names))


# Recordings cut off ----------------------------------------------------------------------------
# A recorder killed or a robot powered off mid-recording leaves its last MCAP file without its
# summary and footer, which rosbags refuses. Such a file is read here as its whole records
# followed by a footer naming no summary, which rosbags reads by a scan, with an index of its whole
# chunks so that rosbags reads them in log-time order as it reads an intact file (a recorder logs
# messages at their receipt but writes them as its callbacks run: log times step back). Every
# message of a chunk the recorder finished is read; a chunk cut in two, or one that does not
# decompress (blocks the file system never wrote read as zeros), and what follows it are not.

MCAP_MAGIC = b'\x89MCAP0\r\n'
_MCAP_HEADER, _MCAP_FOOTER, _MCAP_CHUNK, _MCAP_DATA_END = 0x01, 0x02, 0x06, 0x0F
_MCAP_OPCODES = range(0x01, 0x11)  # of the MCAP records; 0x00 (what a file system's unwritten
#                                     blocks read as) and above are not records
_RECORD_HEAD = struct.Struct('<BQ')  # opcode, length
_CHUNK_HEAD = struct.Struct('<QQQII')  # start and end log times, size and CRC, compression length


def _record(opcode: int, content: bytes) -> bytes:
    return _RECORD_HEAD.pack(opcode, len(content)) + content


# A Header (profile ros2, no library) for a file cut before its own ended.
_MCAP_START = MCAP_MAGIC + _record(_MCAP_HEADER, (4).to_bytes(4, 'little') + b'ros2' + bytes(4))
# Data End (no data CRC), then a Footer with no summary (offsets and CRC 0), then the magic.
_MCAP_END = _record(_MCAP_DATA_END, bytes(4)) + _record(_MCAP_FOOTER, bytes(20)) + MCAP_MAGIC


@dataclasses.dataclass(frozen=True)
class CutMcap:
    """What of an MCAP file cut off is read: its first `whole` bytes (after `start`, a Header
    standing in for one cut off itself), then _MCAP_END; its whole `chunks`."""

    size: int  # of the file
    whole: int
    start: bytes = b''
    chunks: tuple[ChunkInfo, ...] = ()


def cut_mcap(path: pathlib.Path) -> CutMcap | None:
    """How to read the MCAP file `path` when it lacks its footer (cut off); None for a file that
    ends as MCAP files end, or that does not begin as one (rosbags says what is wrong)."""
    with open(path, 'rb') as file:
        size = os.fstat(file.fileno()).st_size
        begin = file.read(len(MCAP_MAGIC))
        if not MCAP_MAGIC.startswith(begin):
            return None
        file.seek(-min(size, len(MCAP_MAGIC)), os.SEEK_END)
        if size >= len(MCAP_MAGIC) + len(_MCAP_END) and file.read() == MCAP_MAGIC:
            return None
        end, chunks = len(begin), []
        while end + _RECORD_HEAD.size <= size:
            file.seek(end)
            opcode, length = _RECORD_HEAD.unpack(file.read(_RECORD_HEAD.size))
            if end == len(MCAP_MAGIC) and opcode != _MCAP_HEADER:
                return None  # damaged, not cut within its Header: rosbags says what it meets
            if (opcode not in _MCAP_OPCODES or opcode in (_MCAP_FOOTER, _MCAP_DATA_END)
                    or end + _RECORD_HEAD.size + length > size
                    or (end == len(MCAP_MAGIC)) != (opcode == _MCAP_HEADER)):
                break
            if opcode == _MCAP_CHUNK:
                chunks.append(_chunk_info(file, end, length))
            end += _RECORD_HEAD.size + length
        if end <= len(MCAP_MAGIC):  # cut before its Header ended: it holds nothing
            return CutMcap(size, 0, _MCAP_START)
        while chunks and not _decompresses(file, chunks[-1]):
            end = chunks.pop().chunk_start_offset
        return CutMcap(size, end, b'', tuple(chunks))


def _chunk_info(file, offset: int, length: int) -> ChunkInfo:
    """The index entry of the whole Chunk record at `offset` (its content `length` bytes), as
    rosbags reads it from a summary, but for its channels (_McapReader.open)."""
    start, end, uncompressed, _, name_length = _CHUNK_HEAD.unpack(file.read(_CHUNK_HEAD.size))
    compression = file.read(name_length).decode()
    compressed = int.from_bytes(file.read(8), 'little')
    return ChunkInfo(start, end, offset, _RECORD_HEAD.size + length, {}, 0, compression,
                     compressed, uncompressed, {})


def _decompresses(file, chunk: ChunkInfo) -> bool:
    """Whether a chunk decompresses to its size and CRC, as rosbags checks it when reading."""
    file.seek(chunk.chunk_start_offset + _RECORD_HEAD.size + 24)
    crc = int.from_bytes(file.read(4), 'little')
    file.seek(chunk.chunk_start_offset + _RECORD_HEAD.size + _CHUNK_HEAD.size
              + len(chunk.compression) + 8)
    try:
        decompress(file.read(chunk.compressed_size), chunk.compression, chunk.uncompressed_size,
                   crc)
    except Exception:  # noqa: BLE001 - whatever a damaged stream raises
        return False
    return True


def _inflate(data: bytes, size: int, frame_decompressor) -> bytes:
    """The frames of `data` inflated to one byte past `size` at most, each by a new
    `frame_decompressor()`; ReaderError for a frame cut short. rosbags inflated them whole: zstd
    packs a GiB of zeros in some 32 kB, lz4 in 4 MB, so a damaged or hostile chunk or message
    took gigabytes before it failed as too large, or did not fail."""
    parts, left = [], size + 1
    while data and left > 0:
        frame = frame_decompressor()
        parts.append(frame.decompress(data, left))
        left -= len(parts[-1])
        if not frame.eof:
            if left > 0:
                raise ReaderError('its compressed data ends inside a frame (cut short)')
            break  # at the limit: the caller says it is too large
        data = frame.unused_data
    return b''.join(parts)


# What rosbags' MCAP storage (and _decompresses) inflates every chunk with: to its declared size.
storage_mcap.DECOMPRESSORS['zstd'] = partial(_inflate, frame_decompressor=zstd.ZstdDecompressor)
storage_mcap.DECOMPRESSORS['lz4'] = partial(_inflate,
                                            frame_decompressor=lz4.frame.LZ4FrameDecompressor)

# rosbag2's compression_mode 'message' and 'file' declare no inflated size: a message may inflate
# to the largest image the package decodes (MAX_PIXELS of its widest encoding) and a little more,
# a file to a share of the free space where rosbags unpacks it (the temporary directory).
MESSAGE_LIMIT = MAX_PIXELS * max(fmt.channels * np.dtype(fmt.dtype).itemsize
                                 for fmt in FORMATS.values()) + (1 << 20)
UNPACK_SHARE = 0.9


def _inflate_message(data: bytes) -> bytes:
    """A message of a bag compressed per message, inflated to MESSAGE_LIMIT at most."""
    raw = _inflate(data, MESSAGE_LIMIT, zstd.ZstdDecompressor)
    if len(raw) > MESSAGE_LIMIT:
        raise ReaderError(f'a message inflates past {MESSAGE_LIMIT} bytes, more than the '
                          'largest image: damaged, or not rosbag2 message compression')
    return raw


class _UnpackedFile(zstd.ZstdFile):
    """A storage file of a bag compressed per file, read inflated to UNPACK_SHARE of the free
    space in the temporary directory at most (rosbags unpacks it there, as large as it says)."""

    def __init__(self, file, mode: str = 'rb'):
        super().__init__(file, mode)
        self._name = file.name
        folder = tempfile.gettempdir()
        self._room = int(shutil.disk_usage(folder).free * UNPACK_SHARE)
        self._where = f'{UNPACK_SHARE:.0%} of the free space in {folder}'

    def read(self, size: int = -1) -> bytes:
        data = super().read(self._room + 1 - self.tell() if size < 0 else size)
        if self.tell() > self._room:
            raise ReaderError(f'{self._name}: inflates past {self._room} bytes ({self._where}, '
                              'where it is unpacked to be read; TMPDIR names another folder)')
        return data


class _Zstd:
    """What rosbags' directory reader inflates messages (decompress) and files (open) with."""

    decompress = staticmethod(_inflate_message)
    open = _UnpackedFile


rosbag2_reader.zstd = _Zstd


class _CutMcapFile(io.RawIOBase):
    """An MCAP file cut off, read as `cut` says: `start`, its first `whole` bytes, _MCAP_END."""

    def __init__(self, path: pathlib.Path, cut: CutMcap):
        super().__init__()
        self._file = open(path, 'rb')  # noqa: SIM115 - closed with this file
        self._start = cut.start
        self._file_end = len(cut.start) + cut.whole  # where the file's bytes end here
        self._size = self._file_end + len(_MCAP_END)
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast('B')
        position, file_start = self._position, len(self._start)
        if file_start <= position < self._file_end:
            self._file.seek(position - file_start)
            count = self._file.readinto(view[:self._file_end - position]) or 0
        else:
            made = (self._start[position:] if position < file_start
                    else _MCAP_END[position - self._file_end:])
            count = min(len(view), len(made))
            view[:count] = made[:count]
        self._position += count
        return count

    def close(self) -> None:
        self._file.close()
        super().close()


@dataclasses.dataclass(frozen=True)
class DamagedChunk:
    """A chunk of an MCAP file that did not read (a bit flipped in its data, a wrong CRC or
    length inside it: damaged storage), as its index entry tells of it."""

    start: int  # its first and last log times, ns
    end: int
    messages: int  # of every channel, as its message indexes count them
    reason: str


class _McapReader(McapReader):
    """rosbags' MCAP reader that reads a file cut off by a crash as cut_mcap says, and skips
    the chunks that do not read, keeping them in `damaged` (by offset in the file)."""

    cut: CutMcap | None = None

    def open(self) -> None:
        self.damaged: dict[int, DamagedChunk] = {}
        self.cut = cut_mcap(pathlib.Path(self.path))
        if self.cut is None:
            super().open()
            return
        # What McapReader.open does with the file, on the file with its end made good; then
        # the index of its chunks, as read_index would have read it from a summary (where each
        # chunk's message indexes count its channels' messages: here any channel may be in it).
        self.bio = io.BufferedReader(_CutMcapFile(pathlib.Path(self.path), self.cut))
        try:
            self._open()
        except BaseException:
            with contextlib.suppress(Exception):
                self.close()
            raise
        self.chunks.extend(chunk._replace(channel_count=dict.fromkeys(self.channels, 1))
                           for chunk in self.cut.chunks)

    def messages(self, connections, start: int | None = None, stop: int | None = None):
        """McapReader.messages, each chunk read by _chunk_messages: a damaged chunk is skipped
        and the others read, as a chunk index allows (a file without one is read by a scan that
        any damage ends)."""
        if not self.chunks:
            yield from super().messages(connections, start, stop)
            return
        channel_map = {connection.id: connection for connection in connections}
        sources = [self._chunk_messages(chunk, channel_map,
                                        chunk.message_start_time if start is None else start,
                                        chunk.message_end_time + 1 if stop is None else stop)
                   for chunk in self.chunks
                   if (start is None or start < chunk.message_end_time + 1)
                   and (stop is None or chunk.message_start_time < stop)
                   and any(chunk.channel_count.get(cid, 0) for cid in channel_map)]
        for log_time, offset, connection, data in heapq.merge(*sources):
            if offset:  # not a chunk's start marker
                yield connection, log_time, data

    def _chunk_messages(self, chunk: ChunkInfo, channel_map: dict, start: int, stop: int):
        """rosbags' msgsrc of one chunk (its start marker, then its messages in log-time order),
        or the marker alone for a chunk that does not read, which `damaged` records."""
        source = msgsrc(chunk, channel_map, start, stop, self.bio)
        yield next(source)  # the marker, which reads nothing: heapq.merge orders chunks by it
        try:  # msgsrc reads the chunk whole before it yields a message
            messages = list(source)
        except Exception as error:  # noqa: BLE001 - whatever damaged bytes raise
            self.damaged[chunk.chunk_start_offset] = DamagedChunk(
                chunk.message_start_time, chunk.message_end_time,
                sum(chunk.channel_count.values()), _reason(error).rstrip('.'))
            return
        yield from messages


# Paths with '#', '?' or '%' ----------------------------------------------------------------------
# rosbags' sqlite3 storage (0.11.9, as requirements.txt pins it) opens its database as the URI
# f'file:{path}' (and '?immutable=1' to read), in which SQLite takes '#' for the start of a
# fragment, '?' for that of a query and '%41' for 'A': a bag under such a path was written to a
# stray file beside it, and could not be read. Its reader and writer here get their path as a
# _UriPath, which the URI then holds percent-encoded (test_bag's bags under such paths check that
# a new rosbags still formats it so).

class _UriPath(type(pathlib.Path())):
    """A path that an f-string formats as a file: URI's path, percent-encoded; str() and file
    operations see it as it is."""

    def __format__(self, spec: str) -> str:
        return format(self.absolute().as_uri().removeprefix('file://'), spec)


class _Sqlite3Reader(Sqlite3Reader):
    # rosbags opens the database immutable, which reads nothing of a -wal file beside it: what a
    # recording in WAL mode (rosbag2's resilient preset) that a crash cut off committed last.
    def __init__(self, path) -> None:
        super().__init__(_UriPath(path))
        wal = pathlib.Path(f'{path}-wal')
        self.unmerged = wal if wal.is_file() and wal.stat().st_size else None


class _Sqlite3Writer(Sqlite3Writer):
    def __init__(self, path: pathlib.Path, compression: CompressionMode) -> None:
        super().__init__(_UriPath(path), compression)


class _Writer(Writer):
    STORAGE_PLUGINS = {**Writer.STORAGE_PLUGINS, StoragePlugin.SQLITE3: _Sqlite3Writer}


class _DirectoryReader(DirectoryReader):
    STORAGE_PLUGINS = {**DirectoryReader.STORAGE_PLUGINS, 'mcap': _McapReader,
                       'sqlite3': _Sqlite3Reader}

    def open(self) -> None:
        """Open, and count each topic's messages as its files hold them where one was cut off
        (metadata.yaml, as the recorder or `ros2 bag reindex` wrote it, counts the messages
        recorded); the bag's span and count are always its files'."""
        super().open()
        for connection in self.connections:  # as metadata.yaml gives them: rosbags checks none
            if not (isinstance(connection.topic, str) and isinstance(connection.msgtype, str)
                    and type(connection.msgcount) is int and connection.msgcount >= 0):
                self.close()
                raise ReaderError(f'{self.path / "metadata.yaml"}: topic {connection.topic!r} '
                                  f'of type {connection.msgtype!r} counts '
                                  f'{connection.msgcount!r} messages: a name and a type are '
                                  'text, a message_count a whole number')
        if any(getattr(storage, 'cut', None) for storage in self.storages):
            # Each file's connection counts for the one it is read as (by topic, type and QoS,
            # as DirectoryReader.messages matches them): a topic may have several, of other QoS.
            held = collections.Counter()
            for storage in self.storages:
                for stored in storage.connections:
                    read_as = next((connection for connection in self.connections
                                    if (connection.topic, connection.msgtype, connection.ext)
                                    == (stored.topic, stored.msgtype, stored.ext)), None)
                    if read_as is not None:
                        held[read_as.id] += stored.msgcount
            self.connections = [connection._replace(msgcount=held[connection.id])
                                for connection in self.connections]
        # The span and count of what the storage files hold, not metadata.yaml's: that may be
        # stale (a recording cut off) or wrong (a later starting_time made every message seem to
        # lie before the bag's start, and a window from its start read none of them).
        stored = [storage.metadata for storage in self.storages]
        count = sum(one.message_count for one in stored)
        start = min((one.start_time for one in stored if one.message_count), default=2**63 - 1)
        end = max((one.end_time for one in stored if one.message_count), default=0)
        self.metadata = self.metadata._replace(duration=end - start if count else 0,
                                               start_time=start, end_time=end,
                                               message_count=count)


class _Reader(Reader):
    STORAGE_PLUGINS = {**Reader.STORAGE_PLUGINS, 'dir': _DirectoryReader, '.mcap': _McapReader,
                       '.db3': _Sqlite3Reader}


def _storages(reader: Reader) -> list:
    """The storage readers of `reader`: a directory's, one per file, or a bare file's own."""
    return getattr(reader.storage, 'storages', [reader.storage])


def _file_label(reader: Reader, storage) -> str:
    """How a line about one of the bag's files starts: its name, unless it is the only one."""
    return '' if storage is reader.storage else f'{pathlib.Path(storage.path).name}: '


def cut_files(reader: Reader) -> list[str]:
    """What `reader` read of its MCAP files cut off (cut_mcap), and which sqlite3 files it read
    without the -wal file beside them, one line each."""
    lines = []
    for storage in _storages(reader):
        name = _file_label(reader, storage)
        cut = getattr(storage, 'cut', None)
        if cut is not None:
            lines.append(f'{name}cut off (no MCAP footer: a recording that ended in a crash or '
                         f'power loss): read up to its last whole record, {cut.whole} of '
                         f'{cut.size} bytes')
        unmerged = getattr(storage, 'unmerged', None)
        if unmerged is not None:
            database = unmerged.name.removesuffix('-wal')
            lines.append(f'{name}not read: the messages in {unmerged.name} beside it (a '
                         'recording cut off, or still running); once it has stopped, '
                         f"`sqlite3 {database} 'PRAGMA wal_checkpoint'` merges them in")
    return lines


def damaged_files(reader: Reader, start: int | None = None,
                  stop: int | None = None) -> list[str]:
    """What `reader` skipped so far of its MCAP files' damaged chunks (_McapReader) that hold
    messages logged from `start` to before `stop`, one line a file: how many messages, logged
    when (seconds into the bag), and why; [] for none."""
    lines = []
    for storage in _storages(reader):
        damaged = sorted(_damaged_chunks(storage, start, stop), key=lambda chunk: chunk.start)
        if not damaged:
            continue
        name = _file_label(reader, storage)
        spans = ', '.join(f'{(chunk.start - reader.start_time) / 1e9:g} s to '
                          f'{(chunk.end - reader.start_time) / 1e9:g} s' for chunk in damaged)
        lost = sum(chunk.messages for chunk in damaged)
        others = ('the others were read' if len(damaged) < len(storage.chunks)
                  else 'the file holds no other')
        lines.append(f'{name}{len(damaged)} damaged chunk{"s" * (len(damaged) > 1)} skipped '
                     f'(first: {damaged[0].reason}): {lost} messages logged from {spans} into '
                     f'the bag lost; {others}')
    return lines


def lost_messages(reader: Reader, start: int | None = None, stop: int | None = None) -> int:
    """The messages of every topic in the damaged chunks `reader` skipped so far that hold
    messages logged from `start` to before `stop`."""
    return sum(chunk.messages for storage in _storages(reader)
               for chunk in _damaged_chunks(storage, start, stop))


def _damaged_chunks(storage, start: int | None, stop: int | None) -> list[DamagedChunk]:
    """The damaged chunks a storage reader skipped that reach into [start, stop): describing a
    topic reads its first chunks, which a window after them leaves unread."""
    return [chunk for chunk in getattr(storage, 'damaged', {}).values()
            if (start is None or chunk.end >= start) and (stop is None or chunk.start < stop)]


@cache
def typestore():
    """Return the message types of ROS 2 Kilted (the distro this package targets)."""
    return get_typestore(Stores.ROS2_KILTED)


# Reading ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def open_bag(path: pathlib.Path | str) -> Iterator[Reader]:
    """Open a bag for reading; any fault while opening or reading is a BagError naming it."""
    path = pathlib.Path(path)
    try:
        reader = _opened_reader(path)
    except PermissionError as error:  # a bag folder the user may not enter or list
        raise BagError(f'{path}: cannot read the bag: {_reason(error)}') from None
    try:
        cut = cut_files(reader)
        if cut and not any(storage.metadata.message_count for storage in _storages(reader)):
            raise BagError(f'{path}: no message to read: {"; ".join(cut)}')
        yield reader
    except BagError as error:  # the damage that made it fail (a topic's messages all lost)
        damaged = damaged_files(reader)
        if damaged:
            raise BagError(f'{error} ({path}: {"; ".join(damaged)})') from None
        raise
    finally:
        with contextlib.suppress(Exception):
            reader.close()


def _opened_reader(path: pathlib.Path) -> Reader:
    """The reader of the bag `path`, opened; a BagError saying what is wrong where it cannot
    be (a PermissionError where the bag's folder may not be entered or listed)."""
    special = _special_file(path)
    if special is not None:
        raise BagError(f'{special}: not a regular file (a FIFO, a device or a folder): not read '
                       'as part of a bag')
    try:
        reader = _Reader(path)
        reader.open()
    except FileNotFoundError as error:
        if path.is_dir() and not (path / 'metadata.yaml').exists():
            files = bag_files(path)
            if not files:
                raise BagError(f'{path}: no metadata.yaml and no bag file') from None
            if is_unindexed_recording(path):
                single = (f', or give its bag file ({path / files[0]})' if len(files) == 1
                          else '')
                raise BagError(f'{path}: no metadata.yaml (a recording still running, or one '
                               f'that was cut off: `ros2 bag reindex` writes it{single})'
                               ) from None
            # A folder of bare bag files, as s4fusion-batch reads it: one is a bag.
            raise BagError(f'{path}: no metadata.yaml, and its bag files are not one '
                           f'recording\'s: give one of them ({path / files[0]})') from None
        raise BagError(f'{path}: no such bag: {_reason(error)}') from None
    except Exception as error:  # noqa: BLE001 - rosbags, sqlite3 and YAML faults alike
        denied = _permission_denied(path)
        if denied:  # another user's recording
            raise BagError(f'{path}: cannot read the bag: {denied}') from None
        _refuse_metadata_yaml(path)
        raise BagError(f'{path}: cannot open the bag (corrupt or truncated?): '
                       f'{" ".join(_reason(error).rstrip(".").split())}') from None
    return reader


def _refuse_metadata_yaml(path: pathlib.Path) -> None:
    """A BagError saying on one line what is wrong with the YAML of the bag folder `path`'s
    metadata.yaml, if anything (rosbags says it in YAML's own lines, a snippet of the file
    among them, or as a bare codec error naming no file)."""
    metadata = path / 'metadata.yaml'
    try:
        data = metadata.read_bytes()
        yaml.safe_load(data)
    except yaml.YAMLError as error:
        raise BagError(f'{metadata}: not readable as YAML (corrupt or truncated?): '
                       f'{yaml_fault(error, data)}') from None
    except OSError:  # a bare bag file, among others: no metadata.yaml to read
        pass


def _special_file(path: pathlib.Path) -> pathlib.Path | None:
    """The first file that reading the bag `path` opens and that is not a regular file (a FIFO,
    whose reading would wait for a writer until Ctrl-C, a device, a folder); None for none
    (rosbags says what is wrong with a metadata.yaml it cannot read, or a file missing)."""
    return next((file for file in _files_read(path) if file.exists() and not file.is_file()),
                None)


def _files_read(path: pathlib.Path) -> list[pathlib.Path]:
    """The files that reading the bag `path` opens: the bag file, or the folder's metadata.yaml
    and the storage files that lists (none where it cannot be read)."""
    if not path.is_dir():
        return [path]
    files = [path / 'metadata.yaml']
    with contextlib.suppress(Exception):  # noqa: BLE001 - YAML faults among them
        if files[0].is_file():
            files += [path / pathlib.PurePath(name).name
                      for name in bag_information(path)['relative_file_paths']]
    return files


def recorded_types(reader: Reader) -> dict[str, set[str]]:
    """The message types each topic was recorded with (several in a merged bag, or where a
    node published another type on it)."""
    recorded = {}
    for connection in reader.connections:
        recorded.setdefault(connection.topic, set()).add(connection.msgtype)
    return recorded


def topic_types(reader: Reader) -> dict[str, str | None]:
    """Each topic's message type. A topic recorded with several (rosbags then gives it none) is
    of its one image type, whose messages are its images; None for a topic of several types
    none or more than one of which is an image type."""
    resolved = {}
    for topic, types in sorted(recorded_types(reader).items()):
        images = types & set(IMAGE_TYPES)
        resolved[topic] = (next(iter(types)) if len(types) == 1
                           else next(iter(images)) if len(images) == 1 else None)
    return resolved


def latched_topics(reader: Reader) -> set[str]:
    """Topics a publisher was recorded on with transient-local durability (latched, such as
    /robot_description or /tf_static): a replay offers them so, for subscribers that join late."""
    return {connection.topic for connection in reader.connections
            if any(qos.durability == QosDurability.TRANSIENT_LOCAL
                   for qos in _offered_qos(connection))}


def read_messages(reader: Reader, path: pathlib.Path, topics: Iterable[str],
                  start: int | None = None,
                  stop: int | None = None) -> Iterator[tuple[Connection, int, bytes]]:
    """Yield (connection, log time ns, raw CDR) of `topics` in recorded order, only the messages
    of each topic's own type (topic_types): a topic holds one type in a ROS 2 graph.

    `start` and `stop` (log times, ns) limit the messages to start <= log time < stop.
    """
    wanted, types = set(topics), topic_types(reader)
    connections = [c for c in reader.connections
                   if c.topic in wanted and c.msgtype == types[c.topic]]
    if not connections:  # rosbags reads an empty filter as none: every message
        return
    try:
        for connection, log_time, raw in reader.messages(connections=connections, start=start,
                                                         stop=stop):
            yield connection, log_time, raw
    except Exception as error:  # noqa: BLE001 - truncated or corrupt storage
        # An MCAP file cut off without chunks is read by a scan, which needs log-time order.
        recover = ('; `mcap recover` (the mcap CLI) writes an indexed copy'
                   if 'not in timestamp order' in str(error) else '')
        raise BagError(f'{path}: cannot read the bag (truncated or corrupt?): '
                       f'{_reason(error)}{recover}') from None


def log_span(reader: Reader, path: pathlib.Path, topic: str, start: int | None = None,
             stop: int | None = None) -> tuple[int, float]:
    """(messages, seconds from the first to the last log time) of the topic's messages (of its
    type) logged in [start, stop); (0, 0.0) for none. rosbags keeps no times per topic (the bag's
    span may be another topic's): one pass over this one's messages."""
    times = [log_time for _, log_time, _ in read_messages(reader, path, [topic], start, stop)]
    return len(times), (max(times) - min(times)) / 1e9 if times else 0.0


@dataclasses.dataclass(frozen=True)
class LogWindow:
    """Where a TimeWindow lies in a bag: the log times [start, stop) read (ns; stop None: to the
    bag's end), and the bag's first and last log times, which its description counts from."""

    start: int
    stop: int | None
    first: int
    last: int

    @property
    def whole(self) -> bool:
        """Whether the window is the whole bag."""
        return self.start <= self.first and (self.stop is None or self.stop > self.last)

    def share(self) -> float:
        """The part of the bag's log span the window covers."""
        end = self.last + 1 if self.stop is None else min(self.stop, self.last + 1)
        return max(end - self.start, 0) / (self.last + 1 - self.first)

    def describe(self) -> str:
        """Where it lies in seconds into the bag: "from 2 s to 3.5 s of the bag's 3.96829 s"."""
        end = self.last if self.stop is None else min(self.stop, self.last)
        return (f'from {(self.start - self.first) / 1e9:g} s to {(end - self.first) / 1e9:g} s '
                f"of the bag's {(self.last - self.first) / 1e9:g} s")


def log_window(reader: Reader, path: pathlib.Path, window: TimeWindow) -> LogWindow:
    """Place `window` in the bag; one that starts after its last message is a BagError naming
    --start-offset and the bag's span (a duration past the end reads to the end, as ros2 bag
    play plays it)."""
    # rosbags' end_time lies just after the last message.
    first, last = (reader.start_time, reader.end_time - 1) if reader.message_count else (0, 0)
    offset = round(window.start_offset * 1e9)
    if offset > last - first:
        raise BagError(f'{path}: --start-offset {window.start_offset:g} is past the end of the '
                       f'bag: its messages span {(last - first) / 1e9:g} s')
    stop = None if window.duration is None else first + offset + round(window.duration * 1e9)
    return LogWindow(first + offset, stop, first, last)


def newest_before(reader: Reader, path: pathlib.Path, topics: Iterable[str],
                  time_ns: int) -> list[tuple[Connection, int, bytes]]:
    """The newest message of each of `topics` logged before `time_ns`, in log-time order: the
    state in effect where a reading starts (a camera's calibration, which a driver may publish
    seldom). Searched backwards a second, then twice as far each time: only as far back as the
    oldest of them lies (MCAP chunks without the topics are not even read)."""
    newest, missing = {}, set(topics)
    stop, step = time_ns, 10**9
    while missing and stop > reader.start_time:
        start = stop - step
        for message in read_messages(reader, path, missing, start, stop):
            newest[message[0].topic] = message  # the later of a topic's replaces the earlier
        missing -= newest.keys()
        stop, step = start, 2 * step
    return sorted(newest.values(), key=lambda message: message[1])


def deserialize(path: pathlib.Path, connection: Connection, raw: bytes):
    """Decode one message; a corrupt message is a BagError naming the file and topic."""
    try:
        return typestore().deserialize_cdr(raw, connection.msgtype)
    except Exception as error:  # noqa: BLE001 - struct, index and value errors of a bad buffer
        raise BagError(f'{path}: {connection.topic}: cannot decode a {connection.msgtype} '
                       f'message: {_reason(error)}') from None


def _permission_denied(path: pathlib.Path) -> str:
    """Why a file of the bag at `path` may not be read, '' if each may: sqlite3 says only
    'unable to open database file' of a .db3 it is denied."""
    try:
        for file in _files_read(path):
            if file.exists():
                file.open('rb').close()
    except PermissionError as error:
        return _reason(error)
    return ''


def _reason(error: Exception) -> str:
    return str(error) or type(error).__name__


def bag_information(folder: pathlib.Path) -> dict:
    """The rosbag2_bagfile_information of a bag folder's metadata.yaml."""
    return yaml.safe_load((folder / 'metadata.yaml').read_text())['rosbag2_bagfile_information']


def storage_of(path: pathlib.Path) -> str:
    """Return the storage format of a bag that opened: 'mcap' or 'sqlite3'."""
    if path.is_file():
        return 'mcap' if path.suffix == '.mcap' else 'sqlite3'
    return bag_information(path)['storage_identifier']


# Image topics and which camera they are ----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ImageTopic:
    """An image topic of a bag: the encoding of its first message and the camera it looks like."""

    topic: str
    msgtype: str
    count: int
    encoding: str  # '' when unknown (e.g. a CompressedImage format without the source encoding)
    role: str  # 'thermal', 'visible' or '' (cannot tell)
    others: int = 0  # messages of other types recorded on the topic, not read
    near_infrared: bool = False  # a depth camera's (depth_camera_infrared), so no role
    # Both image types, recorded on the topic (a merged bag): it is of neither, and not read.
    several_types: tuple[str, ...] = ()

    @property
    def compressed(self) -> bool:
        """Whether the topic carries sensor_msgs/CompressedImage."""
        return self.msgtype == COMPRESSED_IMAGE

    @property
    def transport(self) -> str:
        """The image_transport it is in, by its name: raw, compressed, compressedDepth or zstd
        (the node's *.transport values)."""
        if not self.compressed:
            return 'raw'
        for transport in ('compressedDepth', 'zstd'):
            if self.topic.endswith(f'/{transport}'):
                return transport
        return 'compressed'

    def describe(self) -> str:
        """One line for messages: topic (type, encoding, count)."""
        if self.several_types:
            kinds = ' and '.join(msgtype.rpartition('/')[2] for msgtype in self.several_types)
            return f'{self.topic} ({kinds}, {self.count} msgs)'
        kind = 'CompressedImage' if self.compressed else 'Image'
        others = f'; {self.others} of other types skipped' if self.others else ''
        infrared = ("; a depth camera's near-infrared, not thermal?" if self.near_infrared
                    else '')
        return (f'{self.topic} ({kind}, {self.encoding or "encoding unknown"}, {self.count} '
                f'msgs{others}{infrared})')


DESCRIBE_TRIES = 10  # corrupt messages skipped to describe a topic by its first good one


def image_topics(reader: Reader, path: pathlib.Path) -> list[ImageTopic]:
    """List the bag's Image and CompressedImage topics, each described by its first message
    that decodes (a topic whose first few do not is described as of unknown encoding); one
    recorded as both is listed with its several_types, unread."""
    topics = []
    recorded = recorded_types(reader)
    for topic, msgtype in sorted(topic_types(reader).items()):
        several = tuple(sorted(recorded[topic] & set(IMAGE_TYPES))) if msgtype is None else ()
        if several:
            count = sum(c.msgcount for c in reader.connections
                        if c.topic == topic and c.msgtype in several)
            topics.append(ImageTopic(topic, '', count, '', '', several_types=several))
            continue
        if msgtype not in IMAGE_TYPES:
            continue
        encoding = decoded = ''
        for tries, (connection, _, raw) in enumerate(read_messages(reader, path, [topic]), 1):
            with contextlib.suppress(BagError):  # fusing fails on it only if it is an input
                message = deserialize(path, connection, raw)
                encoding = message_encoding(message)
                # A bare 'jpeg' or 'png' (MJPEG drivers) gives a role by what its data holds.
                decoded = (decoded_encoding(message) if msgtype == COMPRESSED_IMAGE
                           and not encoding else encoding)
                break
            if tries == DESCRIBE_TRIES:
                break
        counts = collections.Counter()  # of its own type (True) and of others
        for connection in reader.connections:
            if connection.topic == topic:
                counts[connection.msgtype == msgtype] += connection.msgcount
        topics.append(ImageTopic(topic, msgtype, counts[True], encoding,
                                 guess_role(topic, decoded), counts[False]))
    names = [t.topic for t in topics]
    return [dataclasses.replace(t, role='', near_infrared=True)
            if t.role == 'thermal' and depth_camera_infrared(t.topic, names) else t
            for t in topics]


def message_encoding(message) -> str:
    """Return Image.encoding, or the source encoding of a CompressedImage ('bgr8; jpeg ...', or
    the header of a zstd transport message)."""
    if hasattr(message, 'format'):
        if message.format == ZSTD_FORMAT:
            return zstd_encoding(message.data)
        return format_encoding(message.format)
    return message.encoding


def guess_role(topic: str, encoding: str) -> str:
    """Return 'thermal' or 'visible' when the encoding (and topic name) tell, else ''."""
    if NODE_OUTPUT.search(topic):
        return ''
    thermal_name = THERMAL_NAME.search(topic) is not None
    depth_name = DEPTH_NAME.search(topic.removesuffix('/compressedDepth')) is not None
    if ((encoding in THERMAL_ENCODINGS and (thermal_name or not depth_name))
            or (encoding in GRAY8_ENCODINGS and thermal_name)):
        return 'thermal'
    if encoding in COLOR_ENCODINGS and not thermal_name:  # not a false-colour thermal view
        return 'visible'
    return ''


def depth_camera_infrared(topic: str, names: list[str]) -> bool:
    """Whether `topic` lies in an 'ir' namespace (NEAR_INFRARED_SEGMENT; not named like a
    thermal camera) beside a depth* one of a topic among `names` (/camera/ir/image beside
    /camera/depth/image_raw, /ir/image_raw beside /depth_to_rgb/image_raw): a depth camera's
    near-infrared image."""
    if THERMAL_ONLY_NAME.search(topic):
        return False
    infrared = _namespace_before(topic, NEAR_INFRARED_SEGMENT.fullmatch)
    return infrared is not None and any(
        _namespace_before(name, DEPTH_SEGMENT.match) == infrared
        for name in names if name != topic)


def _namespace_before(topic: str, named) -> str | None:
    """The namespace holding the first segment of `topic` for which `named(segment)` holds;
    None if none does."""
    segments = topic.strip('/').split('/')
    for index, segment in enumerate(segments):
        if named(segment):
            return '/'.join(segments[:index])
    return None


def _camera(topic: ImageTopic) -> str:
    """The camera's topic: a /compressed or /compressedDepth twin's without that suffix."""
    return topic.topic.removesuffix(f'/{topic.transport}')


def pick_topics(topics: list[ImageTopic], path: pathlib.Path, thermal: str | None = None,
                visible: str | None = None, values: dict | None = None
                ) -> tuple[ImageTopic, ImageTopic]:
    """Choose the thermal and visible topics: the ones named, else the only ones that look so.

    Where a camera was recorded both raw and as /compressed (or /compressedDepth), the one in the
    transport the node's parameters ``values`` subscribe to (``thermal.transport``,
    ``visible.transport``; raw without them) is taken, so that a replay pairs what the live
    node paired; two cameras are an error.
    """
    found = '; '.join(t.describe() for t in topics) or 'none'
    chosen = {}
    for role, name in (('thermal', thermal), ('visible', visible)):
        if name:
            match = [t for t in topics if t.topic == name]
            if not match:
                raise BagError(f"{path}: no image topic '{name}' (--{role}-topic); image topics "
                               f'in the bag: {found}')
            if _unreadable(match[0]):
                raise BagError(f'{path}: {name} (--{role}-topic) {_unreadable(match[0])}')
            chosen[role] = match[0]
    for role in ('thermal', 'visible'):
        if role in chosen:
            continue
        taken = {t.topic for t in chosen.values()}
        candidates = [t for t in topics if t.role == role and t.topic not in taken]
        cameras = {_camera(t) for t in candidates}
        if len(cameras) == 1:  # one camera, perhaps recorded both raw and as /compressed
            camera = cameras.pop()
            transport = (values or {}).get(f'{role}.transport', 'raw')
            wanted = camera if transport == 'raw' else f'{camera}/{transport}'
            # Its twin may lack the encoding that gives a role ('jpeg' alone): found by name.
            candidates = ([t for t in topics if t.topic == wanted and t.topic not in taken]
                          or candidates[:1])
        if not candidates:
            raise _no_camera(path, role, topics, found)
        if len(candidates) > 1:
            raise BagError(f'{path}: several topics could be the {role} camera; image topics in '
                           f'the bag: {found}. Name it with --{role}-topic')
        if _unreadable(candidates[0]):  # the twin in the transport of the parameters
            raise BagError(f'{path}: {candidates[0].topic}, the {role} camera in the transport '
                           f'of the parameters, {_unreadable(candidates[0])}')
        chosen[role] = candidates[0]
    if chosen['thermal'].topic == chosen['visible'].topic:
        raise BagError(f"{path}: '{chosen['thermal'].topic}' cannot be both thermal and visible")
    return chosen['thermal'], chosen['visible']


def _unreadable(topic: ImageTopic) -> str:
    """Why the topic cannot be fused, whatever its name: '' where it can."""
    if topic.several_types:
        return (f'was recorded with several image types ({", ".join(topic.several_types)}): it '
                'cannot be read as one topic')
    return '' if topic.count else 'holds no messages'


def _no_camera(path: pathlib.Path, role: str, topics: list[ImageTopic], found: str) -> BagError:
    """The error for a camera no topic looks like: why each topic that cannot be fused cannot,
    and the advice to name the camera's topic unless only those could be it."""
    reasons = [f'; {t.topic} {_unreadable(t)}' for t in topics if _unreadable(t)]
    nameable = [t for t in topics if not t.role and not _unreadable(t)]
    advice = f'. Name it with --{role}-topic' if nameable or not reasons else ''
    return BagError(f'{path}: no topic looks like the {role} camera{"".join(reasons)}; image '
                    f'topics in the bag: {found}{advice}')


# Writing ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def create_bag(path: pathlib.Path | str, storage: str = 'mcap', overwrite: bool = False,
               compress: bool = False) -> Iterator[Writer]:
    """Write a new bag directory at `path`, atomically.

    The bag is built in a hidden sibling directory and renamed to `path` when the block ends
    without an exception; otherwise (Ctrl-C, crash, full disk) the partial bag is removed and
    `path` is untouched. An existing `path` is an error unless `overwrite`, and even then only a
    rosbag2 directory is replaced. `compress` zstd-compresses MCAP chunks.
    """
    path = pathlib.Path(path)
    if storage not in STORAGES:
        raise BagError(f"{path}: unknown storage '{storage}' (one of {', '.join(STORAGES)})")
    sweep_staging(path)
    check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging, held = _held_staging(path)
    # In a folder of its own: the bag it replaces goes to staging/'replaced', a name it may have.
    # Named as its storage files are to be (rosbags names them after it).
    bag = staging / 'new' / storage_name(path)
    try:
        bag.parent.mkdir()
        writer = _Writer(bag, version=BAG_VERSION, storage_plugin=StoragePlugin[storage.upper()])
        if compress and storage == 'mcap':
            writer.set_compression(CompressionMode.STORAGE, CompressionFormat.ZSTD)
        with writer:
            yield writer
        check_storage_files(bag, path)
        # On disk before it gets its name: a crash must not leave a truncated bag that a
        # resumed batch run would take for a finished one.
        sync_tree(bag)
        if path.exists():
            check_output(path, overwrite)
            path.rename(staging / 'replaced')  # removed with the staging directory
        bag.rename(path)
        with contextlib.suppress(OSError):  # the bag is in place; some file systems refuse this
            sync_to_disk(path.parent)  # the rename itself
    finally:
        remove_staging(staging, path)
        os.close(held)


def storage_name(path: pathlib.Path) -> str:
    """The name of the storage files of a bag written at `path`: its own, each byte that is not
    UTF-8 (of a Latin-1 name, held as a surrogate) replaced by U+FFFD. metadata.yaml lists them,
    and ros2 bag's YAML reader refuses a surrogate's escape ('invalid unicode'). Returned as this
    process's file names hold those bytes: where they are ASCII (the C locale without UTF-8
    mode), U+FFFD is surrogates too."""
    return os.fsdecode(os.fsencode(path.name).decode(errors='replace').encode())


def check_storage_files(bag: pathlib.Path, path: pathlib.Path) -> None:
    """Refuse the bag written at `bag` (to be `path`) if a storage file that its metadata.yaml
    lists is not there: a storage that wrote it elsewhere (rosbags' sqlite3 one did, under a path
    with '#') must not leave a bag reported written that holds no message."""
    for name in bag_information(bag)['relative_file_paths']:
        if not (bag / name).is_file():
            # A write fault (WRITE_ERRORS): the tools say the output was not written.
            raise WriterError(f'{path / name}, which its metadata.yaml lists, was not written')


def _held_staging(path: pathlib.Path) -> tuple[pathlib.Path, int]:
    """Make a staging directory for `path` and take an flock on it for the attempt writing in
    it (released with the returned descriptor, or with the process): how sweep_staging tells a
    live attempt's from a dead one's. A directory swept before its lock was taken (a sweeper
    holds the lock while it removes) is replaced by a new one. Where the file system has no
    flock for folders, every attempt's looks dead to a sweep."""
    while True:
        staging = path.parent / f'.{path.name}.{secrets.token_hex(STAGING_HEX_BYTES)}.partial'
        staging.mkdir()
        try:
            folder = os.open(staging, os.O_RDONLY)
        except FileNotFoundError:  # swept already
            continue
        with contextlib.suppress(OSError):  # BlockingIOError cannot come: the lock blocks
            fcntl.flock(folder, fcntl.LOCK_EX)  # a sweeper holds it for an instant at most
        if os.fstat(folder).st_nlink:  # still there, not swept while the lock was awaited
            return staging, folder
        os.close(folder)


def sweep_staging(path: pathlib.Path) -> list[pathlib.Path]:
    """Remove the staging directories that dead create_bag attempts (killed) left beside `path`,
    each putting back a bag it had moved aside to replace; returns them. One whose lock a live
    attempt holds stays; the others are removed while this holds their lock."""
    swept = []
    for staging in staging_dirs(path):
        try:
            folder = os.open(staging, os.O_RDONLY)
        except OSError:  # swept meanwhile by another, or not ours to open: left alone
            continue
        try:
            fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live attempt's
            os.close(folder)
            continue
        except OSError:  # no flock on this file system: taken for dead (see _held_staging)
            pass
        try:
            remove_staging(staging, path)
            swept.append(staging)
        finally:
            os.close(folder)
    return swept


def remove_staging(staging: pathlib.Path, path: pathlib.Path) -> None:
    """Remove a staging directory of create_bag for `path`; an attempt stopped between moving
    the bag it replaces aside and renaming the new one in (an exception, or a kill: swept
    later) leaves that bag in it, which goes back to `path`."""
    if (staging / 'replaced').is_dir() and not path.exists():
        (staging / 'replaced').rename(path)
    shutil.rmtree(staging, ignore_errors=True)


def staging_dirs(path: pathlib.Path) -> list[pathlib.Path]:
    """The staging directories of create_bag beside `path` (live attempts' and dead ones'), and
    not those of another bag whose name begins with this one's ('x' and 'x.1'). Eight characters of
    tempfile's alphabet also match the names of releases before the hex ones."""
    own = re.compile(rf'\.{re.escape(path.name)}\.[0-9a-z_]{{{2 * STAGING_HEX_BYTES}}}\.partial')
    return [found for found in path.parent.glob(f'.{glob.escape(path.name)}.*.partial')
            if own.fullmatch(found.name)]


def check_output(path: pathlib.Path, overwrite: bool) -> None:
    """Refuse an existing `path` unless `overwrite`; even then, replace only a rosbag2 bag."""
    if not path.exists():
        return
    if not (path / 'metadata.yaml').is_file():  # --overwrite would not help: say so first
        raise BagError(f'{path} exists and is not a rosbag2 directory; not replacing it (remove '
                       'it or name another output)')
    if not overwrite:
        raise BagError(f'{path} exists; pass --overwrite to replace it')


def add_topic(writer: Writer, topic: str, qos: Qos = RELIABLE_QOS,
              msgtype: str = IMAGE) -> Connection:
    """Register a topic of a type the type store knows (an Image by default) with its
    definition and type hash."""
    return writer.add_connection(topic, msgtype, typestore=typestore(), offered_qos_profiles=[qos])


def copy_topic(writer: Writer, connection: Connection) -> Connection:
    """Register a topic with the type, definition and QoS of a connection read from a bag."""
    qos = _offered_qos(connection)
    if connection.msgdef.data and connection.digest:
        return writer.add_connection(connection.topic, connection.msgtype,
                                     msgdef=connection.msgdef.data, rihs01=connection.digest,
                                     offered_qos_profiles=qos)
    # Older bags carry neither: take them from the type store.
    return writer.add_connection(connection.topic, connection.msgtype,
                                 typestore=typestore(), offered_qos_profiles=qos)


def copy_connections(writer: Writer, connections: Iterable[Connection]) -> dict[int, Connection]:
    """Register the connections read from a bag as they were recorded: {input id: output}.

    A topic recorded through several connections (publishers of other QoS, merged bags) keeps
    each one's QoS; connections alike in topic, type and QoS share one, which is all a writer
    takes.
    """
    copies, alike = {}, {}
    for connection in connections:
        key = (connection.topic, connection.msgtype, repr(_offered_qos(connection)))
        if key not in alike:
            alike[key] = copy_topic(writer, connection)
        copies[connection.id] = alike[key]
    return copies


def _offered_qos(connection: Connection) -> list:
    ext = connection.ext
    return ext.offered_qos_profiles if isinstance(ext, ConnectionExtRosbag2) else []


def image_cdr(raw: RawImage, stamp_ns: int, frame_id: str) -> memoryview:
    """Serialize packed image fields as a sensor_msgs/msg/Image with the given header."""
    types = typestore().types
    message = types[IMAGE](header=_header(stamp_ns, frame_id), height=raw.height, width=raw.width,
                           encoding=raw.encoding, is_bigendian=raw.is_bigendian, step=raw.step,
                           data=np.frombuffer(raw.data, np.uint8))
    return typestore().serialize_cdr(message, IMAGE)


def compressed_image_cdr(data: bytes, format: str, stamp_ns: int, frame_id: str) -> memoryview:
    """Serialize encoded image bytes as a sensor_msgs/msg/CompressedImage with the given header."""
    types = typestore().types
    message = types[COMPRESSED_IMAGE](header=_header(stamp_ns, frame_id), format=format,
                                      data=np.frombuffer(data, np.uint8))
    return typestore().serialize_cdr(message, COMPRESSED_IMAGE)


def camera_info_cdr(info, stamp_ns: int, frame_id: str) -> memoryview:
    """Serialize a CameraInfo read from a bag with the given header."""
    return typestore().serialize_cdr(
        dataclasses.replace(info, header=_header(stamp_ns, frame_id)), CAMERA_INFO)


def _header(stamp_ns: int, frame_id: str):
    types = typestore().types
    sec, nanosec = ns_to_sec_nanosec(stamp_ns)
    return types['std_msgs/msg/Header'](
        stamp=types['builtin_interfaces/msg/Time'](sec=sec, nanosec=nanosec), frame_id=frame_id)


def bag_size(path: pathlib.Path) -> int:
    """Return the bytes on disk of a bag directory or file."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob('*') if f.is_file())
