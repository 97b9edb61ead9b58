"""Where log lines come from: files (plain, gzip, bzip2, xz), stdin, and files being written.

Everything here deals in *chunks*: ``bytes`` holding whole lines, each chunk
ending with a newline (a last line without one gets one), a few MB at a time,
so that the parsers can work on many lines per call.  Compression is
recognised by its magic bytes, not by the file name, so ``zcat``-less pipes
(``cat x.gz | npcalls ingest t -``) work too.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import sys
from typing import BinaryIO, Callable, Iterator

__all__ = ["CHUNK", "Source", "SourceError", "TruncatedInput", "open_source", "Tail"]

CHUNK = 4 << 20
"""Bytes read at a time: large enough to amortise per-call costs, small enough for the caches."""

_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"))


class SourceError(OSError):
    """An input cannot be opened or read (the message names it)."""


class TruncatedInput(SourceError):
    """A compressed input ends early; the chunks before were yielded (the message names it)."""


def _peek(f: BinaryIO, n: int) -> bytes:
    peek = getattr(f, "peek", None)
    if peek is not None:
        try:
            return peek(n)[:n]
        except (OSError, ValueError):
            return b""
    return b""


class Source:
    """One input: a name for reports, a binary stream of its (decompressed) bytes.

    Attributes
    ----------
    name : str
        The path as given, or ``<stdin>``.
    size : int or None
        Size of the file on disk (compressed size for compressed files), if known.
    compression : str or None
        ``"gzip"``, ``"bzip2"``, ``"xz"`` or None.
    """

    def __init__(self, name: str, stream: BinaryIO, raw: BinaryIO, size: int | None,
                 compression: str | None, owned: bool) -> None:
        self.name = name
        self.stream = stream
        self.raw = raw
        self.size = size
        self.compression = compression
        self._owned = owned

    def position(self) -> int:
        """Bytes of the underlying file consumed so far (for progress bars)."""
        try:
            return self.raw.tell()
        except (OSError, ValueError):
            return 0

    def chunks(self, size: int | None = None) -> Iterator[bytes]:
        """Yield the input as chunks of whole lines, each ending with ``\\n``.

        ``size``: bytes to read at a time (default :data:`CHUNK`).
        """
        size = size or CHUNK
        read: Callable[[int], bytes] = self.stream.read
        if self.compression is not None:
            yield from self._decompressed(size)
            return
        if self.size is None and self.compression is None and hasattr(self.stream, "read1"):
            read = self._read_available      # a pipe: do not wait for a full chunk
        elif hasattr(self.stream, "readline"):
            # files: complete the chunk's last line with readline (one copy
            # of the chunk instead of the two that carrying a tail costs)
            readline = self.stream.readline
            while True:
                try:
                    data = read(size)
                    if data and data[-1] != 10:
                        data += readline() or b""
                except (OSError, EOFError, ValueError) as e:
                    raise SourceError(f"{self.name}: {e}") from None
                if not data:
                    return
                yield data if data[-1] == 10 else data + b"\n"
        carry = b""
        while True:
            try:
                data = read(size)
            except (OSError, EOFError, ValueError) as e:   # a truncated .gz, a bad bz2 block
                raise SourceError(f"{self.name}: {e}") from None
            if not data:
                break
            if carry:
                data = carry + data
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                carry = data            # a very long line: keep collecting
                continue
            carry = data[cut:]
            yield data if cut == len(data) else data[:cut]
        if carry:
            yield carry + b"\n"

    def _decompressed(self, size: int) -> Iterator[bytes]:
        """Chunks of a compressed input, read a block at a time so that a damaged or
        truncated end costs only the lines after the last good block."""
        parts: list[bytes] = []
        n = 0
        carry = b""
        err: BaseException | None = None
        while True:
            try:
                data = self.stream.read1(size)  # type: ignore[attr-defined]
            except (OSError, EOFError, ValueError) as e:
                err = e
                data = b""
            if data:
                parts.append(data)
                n += len(data)
                if n < size:
                    continue
            buf = carry + b"".join(parts)
            parts, n = [], 0
            if data:
                cut = buf.rfind(b"\n") + 1
                carry = buf[cut:]
                if cut:
                    yield buf[:cut]
                continue
            if buf:                      # the end (or the damage): the last line as it is
                yield buf if buf.endswith(b"\n") else buf + b"\n"
            if err is not None:
                raise TruncatedInput(f"{self.name}: truncated or damaged {self.compression} "
                                     f"data: {err}") from None
            return

    def _read_available(self, size: int) -> bytes:
        """Read at least one byte, then whatever more is ready now, up to ``size``.

        A pipe fed by a live proxy (``tail -f log | npcalls ingest t -``)
        must not wait for a full chunk before its lines are loaded; a pipe
        fed by a fast producer still gets large chunks.
        """
        import select
        s = self.stream
        data = s.read1(size)  # type: ignore[attr-defined]
        if not data or len(data) >= size:
            return data
        parts = [data]
        n = len(data)
        try:
            fd = s.fileno()
        except (OSError, ValueError, AttributeError):
            return data
        while n < size:
            try:
                ready = select.select([fd], [], [], 0)[0]
            except (OSError, ValueError):
                break
            if not ready:
                break
            more = s.read1(size - n)  # type: ignore[attr-defined]
            if not more:
                break
            parts.append(more)
            n += len(more)
        return b"".join(parts)

    def close(self) -> None:
        if self._owned:
            try:
                self.stream.close()
            finally:
                if self.raw is not self.stream:
                    self.raw.close()

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _decompressor(kind: str | None, f: BinaryIO) -> BinaryIO:
    if kind == "gzip":
        return gzip.GzipFile(fileobj=f, mode="rb")     # type: ignore[return-value]
    if kind == "bzip2":
        return bz2.BZ2File(f, "rb")                    # type: ignore[return-value]
    if kind == "xz":
        return lzma.LZMAFile(f, "rb")                  # type: ignore[return-value]
    return f


def _kind(f: BinaryIO) -> str | None:
    head = _peek(f, 6)
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    return None


def open_source(path: str, stdin: BinaryIO | None = None) -> Source:
    """Open a path (or ``-`` for stdin) for reading, decompressing if needed.

    Raises
    ------
    SourceError
        The file does not exist, is a directory, or cannot be read.
    """
    if path == "-":
        raw = stdin if stdin is not None else sys.stdin.buffer
        if not hasattr(raw, "peek"):
            raw = io.BufferedReader(raw)
        kind = _kind(raw)
        return Source("<stdin>", _decompressor(kind, raw), raw, None, kind, owned=False)
    try:
        f = open(path, "rb")
    except IsADirectoryError:
        raise SourceError(f"{path}: is a directory") from None
    except OSError as e:
        raise SourceError(f"{path}: {e.strerror or e}") from None
    try:
        st = os.fstat(f.fileno())
        size = st.st_size if os.path.isfile(path) else None
        kind = _kind(f)
    except OSError as e:
        f.close()
        raise SourceError(f"{path}: {e.strerror or e}") from None
    return Source(path, _decompressor(kind, f), f, size, kind, owned=True)


class Tail:
    """Follow a growing file like ``tail -F``: survives rotation and truncation.

    The file is read from its start, then polled: new bytes are returned as
    whole lines; when the path names a new file (rotation by rename, or a
    remove and re-create), the rest of the old file is read first, then the
    new one from its start; when the file shrinks (copytruncate), reading
    restarts at its beginning.  A missing file is waited for.

    Parameters
    ----------
    path : str
        The file to follow (not compressed).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.name = path
        self._f: BinaryIO | None = None
        self._id: tuple[int, int] | None = None
        self._pos = 0
        self._partial = b""
        self.rotations = 0
        self.truncations = 0
        self._open()

    def _open(self) -> bool:
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return False
        except OSError as e:
            raise SourceError(f"{self.path}: {e.strerror or e}") from None
        st = os.fstat(f.fileno())
        self._f, self._id, self._pos = f, (st.st_dev, st.st_ino), 0
        return True

    @property
    def waiting(self) -> bool:
        """True while the file does not exist."""
        return self._f is None

    def _drain(self) -> bytes:
        out = []
        f = self._f
        assert f is not None
        while True:
            data = f.read(CHUNK)
            if not data:
                break
            self._pos += len(data)
            out.append(data)
        return b"".join(out)

    def poll(self) -> bytes:
        """Whatever complete lines have been written since the last call (maybe ``b""``)."""
        if self._f is None and not self._open():
            return b""
        data = self._partial + self._drain()
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None                   # renamed away, the new one not there yet
        if st is not None and (st.st_dev, st.st_ino) != self._id:
            data += self._drain()       # what was written before the rename
            if data and not data.endswith(b"\n"):
                data += b"\n"           # the old file's last line is complete now
            self._f.close()  # type: ignore[union-attr]
            self.rotations += 1
            self._open()
            data += self._drain() if self._f is not None else b""
        elif st is not None and st.st_size < self._pos:
            # truncated in place (copytruncate): the rest of a half-read line
            # went to the copy, so only the complete lines read so far count
            self.truncations += 1
            data = data[:data.rfind(b"\n") + 1]
            self._f.seek(0)  # type: ignore[union-attr]
            self._pos = 0
            data += self._drain()
        cut = data.rfind(b"\n") + 1
        self._partial = data[cut:]
        return data[:cut]

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
