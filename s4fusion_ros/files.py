"""Writing files so that a crash or a stop never leaves a truncated one (no ROS, no torch)."""

import os
import pathlib


def write_atomically(path: pathlib.Path, write) -> None:
    """Fill `path` with write(binary file): via a hidden temporary file, fsync, then rename."""
    temporary = path.with_name(f'.{path.name}.tmp')
    with open(temporary, 'wb') as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def write_text_atomically(path: pathlib.Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` as write_atomically does."""
    write_atomically(path, lambda file: file.write(text.encode()))
