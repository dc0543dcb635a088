"""Writing files so that a crash or a stop never leaves a truncated one, and one writer per output
folder (no ROS, no torch)."""

import contextlib
import fcntl
import os
import pathlib

import numpy as np


def resolved(path: pathlib.Path) -> pathlib.Path:
    """``path.resolve()``, with a symlink loop as an OSError naming the path (Python 3.11
    raises a bare RuntimeError)."""
    try:
        return path.resolve()
    except RuntimeError as error:
        raise OSError(f'{path}: {error}') from None


def write_atomically(path: pathlib.Path, write) -> None:
    """Fill `path` with write(binary file): via a hidden temporary file, fsync, then rename; a
    write that fails or is interrupted leaves `path` as it was and no temporary file."""
    write_together({path: write})


def write_together(writes: dict) -> None:
    """Fill each path of `writes` ({path: write(binary file)}) as write_atomically does, all
    temporary files first, then the renames in order: a write that fails (a full disk) leaves
    every path as it was, so files that belong together (weights and their JSON) never mix."""
    created = []  # (temporary, path): only what this call made is removed on failure
    path = None
    try:
        for path, write in writes.items():
            temporary = path.with_name(f'.{path.name}.tmp')
            with open(temporary, 'wb') as file:
                created.append((temporary, path))
                write(file)
                file.flush()
                os.fsync(file.fileno())
        for temporary, path in created:
            os.replace(temporary, path)
    except BaseException as error:
        for temporary, _ in created:
            temporary.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None:  # a write or fsync: name it
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise


def sync_to_disk(*paths: pathlib.Path) -> None:
    """fsync each of `paths`, files or folders (a folder's own entries, not what they name)."""
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def sync_tree(folder: pathlib.Path) -> None:
    """fsync a folder and everything in it, so that a name it is renamed to after this never
    points at data a crash could still lose."""
    sync_to_disk(*pathlib.Path(folder).rglob('*'), folder)


def check_writable_folder(path: pathlib.Path) -> None:
    """OSError naming `path` where a folder cannot be made or written there: checked before
    long work whose results go there, without making the folder yet."""
    path = pathlib.Path(path)
    existing = path
    while not existing.exists():  # the nearest existing folder it would be made in
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f'{path}: {existing} is not a folder')
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f'{path}: {existing} is not writable')


@contextlib.contextmanager
def held_folder(folder: pathlib.Path, busy: Exception):
    """Hold `folder` (made if missing) for one process writing into it while the block runs;
    raises `busy` where another process holds it. An flock on the folder itself, so no lock file
    is left behind and the lock goes with the process however it ends; where the file system has
    none for folders (some NFS mounts) the block runs unguarded. A folder this made is removed
    after the block if it is still empty: a run refused before any work leaves none behind."""
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise busy from None
        except OSError:
            pass
        yield
    finally:
        if made:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty
        os.close(descriptor)  # releases the lock


def opencv_path(path: pathlib.Path) -> str:
    """``str(path)`` for OpenCV's file functions, which crash the process on a name that is not
    UTF-8 (an old archive's Latin-1 name): ValueError names such a path instead."""
    text = str(path)
    try:
        text.encode('utf-8')
    except UnicodeEncodeError:
        raise ValueError(f'{path!r}: a file name that is not UTF-8, which OpenCV cannot open; '
                         'rename it') from None
    return text


def write_text_atomically(path: pathlib.Path, text: str) -> None:
    """Write `text` to `path` as write_atomically does, encoded as text_bytes does."""
    data = text_bytes(text)
    write_atomically(path, lambda file: file.write(data))


def text_bytes(text: str) -> bytes:
    """`text` in UTF-8. A file name in it that is not UTF-8 (an old archive's Latin-1 name,
    which Python holds as surrogates) is written as the bytes the file system holds."""
    return text.encode('utf-8', 'surrogateescape')


def write_png(path: pathlib.Path, image: np.ndarray) -> None:
    """Write an image as PNG atomically, making its folder; OSError names the file if it cannot."""
    png = png_bytes(path, image)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda file: file.write(png))


def png_bytes(path: pathlib.Path, image: np.ndarray) -> bytes:
    """An image encoded as PNG for `path`; OSError names the file if PNG cannot hold it."""
    # Imported here: OpenCV's import sets LD_LIBRARY_PATH, and the model package, which saves
    # its checkpoints through this module, must leave the importing process as it was.
    import cv2

    try:
        encoded, png = cv2.imencode('.png', image)
    except cv2.error as error:  # an image PNG cannot hold (e.g. 2 channels)
        raise OSError(f'{path}: cannot encode a {image.dtype} {image.shape} image as PNG: '
                      f'{error.err}') from error
    if not encoded:
        raise OSError(f'{path}: cannot encode a {image.dtype} {image.shape} image as PNG')
    return png.tobytes()
