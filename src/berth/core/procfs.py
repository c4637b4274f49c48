"""Process-tree facts: who is in a process group, whether it is gone, what memory it holds."""

from __future__ import annotations

import os

import psutil


def _live(process: psutil.Process) -> bool:
    try:
        return bool(process.status() != psutil.STATUS_ZOMBIE)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) members of a process group."""
    found = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and _live(process):
                found.append(process.pid)
        except (ProcessLookupError, PermissionError):
            continue
    return found


def group_alive(pgid: int) -> bool:
    """True while any non-zombie process is in the process group."""
    return bool(group_pids(pgid))


def pid_alive(pid: int) -> bool:
    try:
        return _live(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid`."""
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True) if _live(p)]
    except psutil.NoSuchProcess:
        return []


def _status_bytes(pid: int, field: str) -> int:
    """A `kB` field of /proc/PID/status, in bytes (0 when the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def anonymous_bytes(pid: int) -> int:
    """The process's resident anonymous memory (RssAnon): its heap, stacks and private buffers, which
    stay until it frees them (file-backed pages can be dropped and read again)."""
    return _status_bytes(pid, "RssAnon")


def mapped_resident_bytes(pid: int, files: frozenset[str]) -> int:
    """Resident bytes of the process's mappings of `files` (real paths), from /proc/PID/smaps."""
    if not files:
        return 0
    total, counting = 0, False
    try:
        with open(f"/proc/{pid}/smaps") as fh:
            for line in fh:
                head, _, rest = line.partition(" ")
                if "-" in head and head[0] in "0123456789abcdef":  # a mapping: range perms offset dev inode path
                    fields = rest.split(maxsplit=4)
                    counting = len(fields) == 5 and fields[4].rstrip("\n") in files
                elif counting and head == "Rss:":
                    total += int(rest.split()[0]) * 1024
    except OSError:
        return 0
    return total


def oom_kill_count() -> int:
    """OOM kills the kernel has made so far: in this process's memory cgroup (memory.events) plus the
    whole system's (/proc/vmstat). Only a change means anything: a SIGKILL with no change was not the
    OOM killer. Counters that cannot be read count as 0."""
    total = 0
    for path, key in (("/sys/fs/cgroup/memory.events", "oom_kill"), ("/proc/vmstat", "oom_kill")):
        try:
            with open(path) as fh:
                for line in fh:
                    name, _, value = line.partition(" ")
                    if name == key and value.strip().isdigit():
                        total += int(value)
        except OSError:
            continue
    return total


def listens_on(pid: int, port: int) -> bool:
    """Whether process `pid` itself holds a TCP socket listening on `port` (not merely: something does)."""
    try:
        return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in psutil.Process(pid).net_connections(kind="tcp"))
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def holds_connection(pid: int, local: tuple[str, int], remote: tuple[str, int]) -> bool:
    """Whether process `pid` or one of its descendants holds the TCP connection from `local` to `remote`
    (addresses as that process sees them): who is at the other end of a loopback connection."""
    for member in [pid, *descendants(pid)]:
        try:
            if any(c.laddr and c.raddr and (c.laddr.ip, c.laddr.port) == local and (c.raddr.ip, c.raddr.port) == remote
                   for c in psutil.Process(member).net_connections(kind="tcp")):
                return True
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return False
