"""Original images on disk, kept so every embedding can be recomputed after a model change.

Files are named by the image's server-generated UUID (never the client's file name) and written
atomically: temporary file, fsync, rename, fsync of the folder. The service writes a file before
the database row that points at it commits, so a crash can leave an orphan file but never a row
without its file.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path


class ImageStoreError(OSError):
    """A stored image is missing or a path escapes the store."""


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def relative_path(species: str, image_id: uuid.UUID, extension: str) -> str:
        hexid = image_id.hex
        return f"{species}/{hexid[:2]}/{hexid}.{extension}"

    @staticmethod
    def image_id(relative: str) -> uuid.UUID | None:
        """The image id a stored file is named by; None for anything else (a temporary file)."""
        try:
            return uuid.UUID(hex=Path(relative).stem)
        except ValueError:
            return None

    def absolute(self, relative: str) -> Path:
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root):
            raise ImageStoreError(f"{relative!r} is outside the image store")
        return path

    def write(self, relative: str, data: bytes) -> None:
        path = self.absolute(relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def read(self, relative: str) -> bytes:
        path = self.absolute(relative)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise ImageStoreError(f"stored image {relative} is missing") from exc

    def delete(self, relative: str) -> None:
        self.absolute(relative).unlink(missing_ok=True)

    def files_older_than(self, seconds: float) -> Iterator[str]:
        """Relative paths of the stored files (temporary ones included) last written more than
        ``seconds`` ago."""
        cutoff = time.time() - seconds
        for folder, _, names in os.walk(self.root):
            for name in names:
                path = Path(folder) / name
                try:
                    written = path.lstat().st_mtime
                except FileNotFoundError:  # deleted meanwhile
                    continue
                if written < cutoff:
                    yield path.relative_to(self.root).as_posix()
