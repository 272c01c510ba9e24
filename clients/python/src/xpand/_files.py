"""File sources and sinks for uploads and downloads, shared by both clients: a path or an open
binary file is read and written a chunk at a time (never whole in memory), with a tqdm bar."""

from __future__ import annotations

import mimetypes
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO, Any, Union

import anyio.to_thread
from tqdm.auto import tqdm

FileSource = Union[str, "os.PathLike[str]", IO[bytes]]
CHUNK = 1 << 20


class Source:
    """What an upload reads: its name, size (when known) and content type, and a way to read
    it again from the start (for a retry), when it can."""

    def __init__(self, file: FileSource, content_type: str | None) -> None:
        self._owned: IO[bytes] | None = None
        self.stream: IO[bytes]
        if isinstance(file, (str, os.PathLike)):
            path = Path(file)
            self.name = path.name
            self._owned = self.stream = path.open("rb")
        else:
            self.stream = file
            self.name = Path(str(getattr(file, "name", "upload"))).name
        self.start = self._tell()
        self.size = self._size()
        self.content_type = (
            content_type or mimetypes.guess_type(self.name)[0] or "application/octet-stream"
        )

    @property
    def rewindable(self) -> bool:
        return self.start is not None

    def rewind(self) -> None:
        if self.start is not None:
            self.stream.seek(self.start)

    def chunks(self, bar: tqdm[Any]) -> Iterator[bytes]:
        """The bytes from the start, a chunk at a time, counted on `bar`."""
        while chunk := self.stream.read(CHUNK):
            bar.update(len(chunk))
            yield chunk

    async def achunks(self, bar: tqdm[Any]) -> AsyncIterator[bytes]:
        """The same, each read in a worker thread so the event loop never waits on the disk."""
        while chunk := await anyio.to_thread.run_sync(self.stream.read, CHUNK):
            bar.update(len(chunk))
            yield chunk

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": self.content_type}
        if self.size is not None:
            headers["Content-Length"] = str(self.size)
        return headers

    def close(self) -> None:
        if self._owned is not None:
            self._owned.close()

    def _tell(self) -> int | None:
        try:
            return self.stream.tell() if self.stream.seekable() else None
        except (AttributeError, OSError):
            return None

    def _size(self) -> int | None:
        try:
            return os.fstat(self.stream.fileno()).st_size - (self.start or 0)
        except (AttributeError, OSError, ValueError):
            return None


def progress_bar(total: int | None, desc: str, enabled: bool) -> tqdm[Any]:
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not enabled,
        leave=True,
    )


def frames_bar(desc: str, enabled: bool) -> tqdm[Any]:
    return tqdm(total=None, desc=desc, unit="frame", disable=not enabled, leave=True)


class Sink:
    """Where a download goes: a path (written beside it as `<name>.part` and moved into place
    once complete, so a broken download never leaves a truncated file) or an open binary file."""

    def __init__(self, dest: FileSource) -> None:
        self.path: Path | None = None
        self._part: Path | None = None
        if isinstance(dest, (str, os.PathLike)):
            self.path = Path(dest)
            self._part = self.path.with_name(self.path.name + ".part")
            self.stream: IO[bytes] = self._part.open("wb")
        else:
            self.stream = dest

    def write(self, chunk: bytes) -> None:
        self.stream.write(chunk)

    def commit(self) -> None:
        if self._part is not None and self.path is not None:
            self.stream.close()
            os.replace(self._part, self.path)

    def abort(self) -> None:
        if self._part is not None:
            self.stream.close()
            self._part.unlink(missing_ok=True)
