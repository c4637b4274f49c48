"""Reading model files into the kernel's page cache ahead of a start (posix_fadvise WILLNEED).

A start from a cold cache reads every weight from disk while llama.cpp loads and warms up; a file
whose pages are cached loads at memory speed. berth asks the kernel to read ahead in a background
thread: just before a start that reads a GGUF (the reads overlap the server's own start-up), and for
the model a TTL stop is about to return to. It never asks for more than the host can hold: the part
of the files not yet cached must fit in the host's available memory less a headroom, or nothing is
read (a half-read file would only push other pages out).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from berth.core.errors import BerthError
from berth.engine.launch import server_args
from berth.memory.devices import weight_files

log = logging.getLogger("berth.pagecache")

_PAGE = os.sysconf("SC_PAGE_SIZE")
SMALLEST_WINDOW = 128 * 1024  # the kernel's default read-ahead window (read_ahead_kb)


def readahead_window(fd: int) -> int:
    """The most one WILLNEED reads on this file's device: Linux caps each call at the device's read-ahead
    window or its largest request (force_page_cache_ra), so a whole file is asked for in such chunks.
    The smallest usual window when the device does not say (overlay, network and anonymous devices)."""
    st = os.fstat(fd)
    device = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    for queue in (device / "queue", device.parent / "queue"):  # a partition's queue is its disk's
        try:
            window = max(int((queue / name).read_text()) for name in ("read_ahead_kb", "max_sectors_kb"))
        except (OSError, ValueError):
            continue
        return max(window * 1024, SMALLEST_WINDOW)
    return SMALLEST_WINDOW


def launch_files(argv: list[str]) -> list[Path]:
    """The weight files a llama.cpp server argv reads at its start (none for other engines)."""
    return [Path(path) for path in sorted(weight_files(server_args(argv)))]


def cached_bytes(path: Path) -> int:
    """How much of the file is in the page cache now (mincore over a read-only mapping)."""
    size = path.stat().st_size
    if size == 0:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            pages = (size + _PAGE - 1) // _PAGE
            vector = ctypes.create_string_buffer(pages)
            if libc.mincore(ctypes.c_void_p(address), size, vector) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            resident = sum(byte & 1 for byte in vector.raw)
        finally:
            libc.munmap(ctypes.c_void_p(address), size)
    finally:
        os.close(fd)
    return min(resident * _PAGE, size)


def drop(path: Path) -> None:
    """Ask the kernel to forget the file's cached pages (POSIX_FADV_DONTNEED); mapped or dirty ones stay."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_ahead(paths: Iterable[Path]) -> int:
    """POSIX_FADV_WILLNEED over each file, a read-ahead window at a time (the kernel reads no more per
    call); returns the bytes asked for. The reads themselves go on in the kernel."""
    asked = 0
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            size, chunk = os.fstat(fd).st_size, readahead_window(fd)
            for offset in range(0, size, chunk):
                length = min(chunk, size - offset)
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
                asked += length
        finally:
            os.close(fd)
    return asked


class PageWarmer:
    """Starts read-aheads in background threads, each limited to what the host can hold."""

    def __init__(self, available_bytes: Callable[[], int], headroom_bytes: int) -> None:
        self._available = available_bytes  # the host's available memory now (cgroup-aware)
        self._headroom = headroom_bytes

    def plan(self, paths: Iterable[Path]) -> tuple[list[Path], int, str | None]:
        """(the files to read, the bytes not yet cached, why nothing is read or None)."""
        files = [p for p in dict.fromkeys(paths) if p.is_file()]
        missing = sum(p.stat().st_size - cached_bytes(p) for p in files)
        if not files or missing <= 0:
            return [], 0, "already cached" if files else "no model file on disk"
        room = self._available() - self._headroom
        if missing > room:
            return [], missing, (f"{missing / 1024**3:.1f} GiB not cached is more than the "
                                 f"{max(room, 0) / 1024**3:.1f} GiB the host can hold")
        return files, missing, None

    def warm(self, model_id: str, files: Callable[[], list[Path]], why: str) -> threading.Thread:
        """Read the model's `files` (worked out in the thread: finding them may read the store) ahead,
        in a background thread."""

        def run() -> None:
            try:
                chosen, missing, skip = self.plan(files())
                if skip is not None:
                    log.debug(f"{model_id}: no read-ahead ({skip})")
                    return
                log.info(f"{model_id}: reading {missing / 1024**2:.0f} MiB of its files into the page cache ({why})")
                read_ahead(chosen)
            except (OSError, BerthError) as exc:  # the file went away, a filesystem without fadvise, a bad cmd
                log.info(f"{model_id}: no read-ahead: {exc}")

        thread = threading.Thread(target=run, name=f"readahead:{model_id}", daemon=True)
        thread.start()
        return thread
