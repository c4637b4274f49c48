"""The model store: pulled files, verified, behind stable paths.

Layout under the store root (default `$BERTH_HOME/models`):

    <name>/files/<path in repo>      the downloaded files, names as upstream has them
    <name>/model.gguf                symlink to the model (split models: the first part)
    <name>/mmproj.gguf               symlink to the projector, when pulled
    <name>/berth-model.json          completion marker, written only after every file verified
    <name>/last-used                 touched whenever a model is launched from the store
    .locks/<name>.lock               held while pulling, so concurrent pulls download once

A directory without a marker is never served.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from berth.core.paths import berth_home, private_dir
from berth.core.errors import BerthError
from berth.core.gguf import GGUFInvalid, check_gguf
from berth.core.refs import SPLIT_SUFFIX, ModelRef

MARKER = "berth-model.json"
_MMPROJ_PREFERENCE = ("f16", "f32", "bf16")
_MMPROJ_WORD = re.compile(r"(^|[-_.])mmproj([-_.]|$)", re.IGNORECASE)
_DISK_MARGIN = 64 * 1024 * 1024


class StoreError(BerthError):
    """A pull or lookup that cannot succeed; the message says what to do."""

    status = 503
    error_type = "server_error"
    code = "model_store_error"


class NotInStore(StoreError):
    status = 404
    error_type = "invalid_request_error"
    code = "model_not_in_store"


class BadSelection(StoreError):
    """The reference does not match what the repo holds (user input: CLI exit 2)."""

    status = 400
    error_type = "invalid_request_error"
    code = "model_not_found_in_repo"


class BadStoreName(BadSelection):
    """A store name that is not one directory name (user input: CLI exit 2)."""

    code = "invalid_store_name"


class UnsafeRemotePath(StoreError):
    """A hub listed a file whose name would be written outside the model's directory."""

    status = 502
    code = "unsafe_remote_path"


_STORE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def check_store_name(name: str) -> str:
    """`name` if it can be a store entry: one directory name, not hidden, no path in it."""
    if not _STORE_NAME.fullmatch(name):
        raise BadStoreName(f"{name!r} is not a store name: use letters, digits, '.', '_' and '-' (at most 200, "
                           "starting with a letter or digit), e.g. --name qwen3-8b-q4_k_m")
    return name


def contained_path(root: Path, relative: str, what: str) -> Path:
    """`root / relative` for a file name that came from elsewhere (a hub's listing); UnsafeRemotePath when it
    is absolute, has `..`, `.` or empty parts or backslashes, or resolves outside `root` (a symlink on the way)."""
    parts = relative.split("/")
    if (not relative or relative.startswith("/") or "\\" in relative or "\0" in relative
            or any(part in ("", ".", "..") for part in parts)):
        raise UnsafeRemotePath(f"{what} lists the file {relative!r}, which is not a plain relative path; refusing to "
                               "write it (absolute paths, '..' and backslashes could land outside the store)")
    path = root / relative
    if not path.resolve().is_relative_to(root.resolve()):
        raise UnsafeRemotePath(f"{what} lists the file {relative!r}, which resolves outside {root}; refusing to "
                               "write it")
    return path


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int | None
    sha256: str | None


@dataclass
class StoreEntry:
    name: str
    directory: Path
    ref: str = ""
    quant: str | None = None
    files: list[dict] = field(default_factory=list)
    verified: bool = False

    @property
    def model_path(self) -> Path:
        return self.directory / "model.gguf"

    @property
    def launch_model_path(self) -> Path:
        """What to pass to -m: the real first part for split models, whose siblings llama.cpp finds by name."""
        target = self.model_path.resolve()
        return target if SPLIT_SUFFIX.search(target.name) else self.model_path

    @property
    def mmproj_path(self) -> Path | None:
        path = self.directory / "mmproj.gguf"
        return path if path.is_symlink() or path.exists() else None

    @property
    def size(self) -> int:
        return sum(f.get("size") or 0 for f in self.files)

    @property
    def last_used(self) -> float | None:
        stamp = self.directory / "last-used"
        return stamp.stat().st_mtime if stamp.exists() else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(4 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def _quant_matches(filename: str, quant: str) -> bool:
    base = filename.rsplit("/", 1)[-1]
    return re.search(rf"(^|[-_.]){re.escape(quant)}([-_.]|$)", base, re.IGNORECASE) is not None


def _is_mmproj(path: str) -> bool:
    """A projector as repos name them: `mmproj-*-F16.gguf`, `mmproj-model-f16.gguf`, `*.mmproj.gguf`,
    `*-mmproj-f16.gguf`: `mmproj` as a word of the file name."""
    return _MMPROJ_WORD.search(path.rsplit("/", 1)[-1]) is not None and path.lower().endswith(".gguf")


def select_model_files(ref: ModelRef, listing: list[RemoteFile]) -> list[RemoteFile]:
    """The files a reference means: one GGUF, or all parts of a split one, in order."""
    ggufs = [f for f in listing if f.path.lower().endswith(".gguf") and not _is_mmproj(f.path)]
    if ref.filename:
        chosen = [f for f in listing if f.path == ref.filename]
        if not chosen:
            raise BadSelection(f"{ref.repo} has no file {ref.filename!r}; its GGUF files: "
                               f"{', '.join(f.path for f in ggufs) or '(none)'}")
        split = SPLIT_SUFFIX.search(ref.filename)
        if split:
            prefix = ref.filename[:split.start()]
            chosen = [f for f in ggufs if f.path.startswith(prefix) and SPLIT_SUFFIX.search(f.path)]
        return sorted(chosen, key=lambda f: f.path)
    candidates = [f for f in ggufs if _quant_matches(f.path, ref.quant)] if ref.quant else ggufs
    groups: dict[str, list[RemoteFile]] = {}
    for f in candidates:
        split = SPLIT_SUFFIX.search(f.path)
        groups.setdefault(f.path[:split.start()] if split else f.path, []).append(f)
    if len(groups) == 1:
        return sorted(next(iter(groups.values())), key=lambda f: f.path)
    available = sorted({m.group(0) for f in ggufs
                        if (m := re.search(r"(?:UD-)?(?:I?Q\d[\w]*|F16|F32|BF16)", f.path.rsplit("/", 1)[-1],
                                           re.IGNORECASE))})
    if not groups:
        raise BadSelection(f"{ref.repo} has no GGUF file for quant {ref.quant!r}; "
                           f"available: {', '.join(available) or '(no GGUF files)'}")
    raise BadSelection(f"{ref} matches several models in {ref.repo}: {', '.join(sorted(groups))}; "
                       "name the file instead (owner/repo/path/file.gguf)")


def select_mmproj(listing: list[RemoteFile], model: RemoteFile | None = None) -> RemoteFile | None:
    """The repo's projector: F16 preferred, then F32, BF16, others; among several of that precision (a repo
    with projectors for several models), the one whose name shares the longest start with `model`'s once
    `mmproj` is taken out of it."""
    projectors = sorted((f for f in listing if _is_mmproj(f.path)), key=lambda f: f.path)
    for precision in _MMPROJ_PREFERENCE:
        matching = [f for f in projectors if _quant_matches(f.path, precision)]
        if matching:
            projectors = matching
            break
    if model is None or not projectors:
        return projectors[0] if projectors else None
    model_name = model.path.rsplit("/", 1)[-1].lower()

    def shared(f: RemoteFile) -> int:
        name = _MMPROJ_WORD.sub(lambda m: m.group(1) if m.group(1) and m.group(2) else "",
                                f.path.rsplit("/", 1)[-1]).lower()
        return len(os.path.commonprefix([name, model_name]))

    return max(projectors, key=shared)  # the first of the best, in name order


def _replace_symlink(link: Path, target: Path) -> None:
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(os.path.relpath(target, link.parent))
    os.replace(tmp, link)


Fetcher = Callable[[RemoteFile, Path], None]  # downloads one file into a directory


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @classmethod
    def default(cls) -> "ModelStore":
        return cls(berth_home() / "models")

    @classmethod
    def at(cls, root: str | Path | None) -> "ModelStore":
        """The store at `root` (a config's `modelStore`), else at $BERTH_HOME/models."""
        return cls(Path(root)) if root else cls.default()

    # -- reading ------------------------------------------------------------------------

    def directory(self, name: str) -> Path:
        """Where the entry `name` lives (BadStoreName for a name that is not one plain directory name)."""
        return self.root / check_store_name(name)

    def entry(self, name: str) -> StoreEntry | None:
        """A verified entry, or None (a directory without a valid marker does not count, nor a name that
        is no store name: a lookup by anything, a path included, finds nothing outside the store)."""
        if not _STORE_NAME.fullmatch(name):
            return None
        directory = self.root / name
        try:
            marker = json.loads((directory / MARKER).read_text())
        except (OSError, ValueError):
            return None
        entry = StoreEntry(name, directory, marker.get("ref", ""), marker.get("quant"), marker.get("files", []),
                           verified=True)
        if not entry.model_path.exists():
            return None
        return entry

    def entries(self) -> list[StoreEntry]:
        if not self.root.is_dir():
            return []
        found = (self.entry(d.name) for d in sorted(self.root.iterdir()) if d.is_dir())
        return [e for e in found if e is not None]

    def recorded_sha256(self, path: str | Path) -> str | None:
        """The sha256 a file in the store was verified against when it was pulled; None for other files."""
        resolved = Path(path).resolve()
        try:
            name = resolved.relative_to(self.root.resolve()).parts[0]
        except (ValueError, IndexError):
            return None
        entry = self.entry(name)
        if entry is None:
            return None
        for record in entry.files:
            if (entry.directory / "files" / record.get("path", "")).resolve() == resolved:
                sha = record.get("sha256")
                return sha if isinstance(sha, str) else None
        return None

    def touch(self, entry: StoreEntry) -> None:
        (entry.directory / "last-used").touch()

    # -- changing -------------------------------------------------------------------------

    @contextmanager
    def lock(self, name: str, cancel: threading.Event | None = None) -> Iterator[None]:
        """Hold the model's pull lock; waiting for it stops when `cancel` is set."""
        locks = private_dir(self.root / ".locks")
        with open(locks / f"{check_store_name(name)}.lock", "w") as fh:
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if cancel is not None and cancel.is_set():
                        raise StoreError(f"waiting for another pull of {name} was cancelled") from None
                    time.sleep(0.1)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def remove(self, name: str) -> None:
        directory = self.directory(name)
        if not directory.is_dir():
            names = ", ".join(e.name for e in self.entries()) or "(the store is empty)"
            raise NotInStore(f"no model named {name!r} in the store at {self.root}; stored: {names}")
        with self.lock(name):
            shutil.rmtree(directory)

    def install(self, name: str, ref: ModelRef, model_files: list[RemoteFile], mmproj: RemoteFile | None,
                fetch: Fetcher, expected_sha256: str | None = None, attempts: int = 3) -> StoreEntry:
        """Fetch, verify and publish the files of one model under `name` (under the store lock).

        `expected_sha256` replaces the hub's hash of a single-file model.
        """
        directory = self.directory(name)
        files_dir = directory / "files"
        wanted = model_files + ([mmproj] if mmproj else [])
        private_dir(files_dir)
        local_paths = [contained_path(files_dir, remote.path, ref.repo) for remote in wanted]
        self._check_disk_space(files_dir, wanted)
        records = []
        for remote, local in zip(wanted, local_paths):
            sha = expected_sha256 if expected_sha256 and remote is model_files[0] else remote.sha256
            for attempt in range(1, attempts + 1):
                fetch(remote, files_dir)
                problem = self._verify(local, remote.size, sha)
                if problem is None:
                    break
                local.unlink(missing_ok=True)
                if attempt == attempts:
                    raise StoreError(f"{remote.path} from {ref.repo} failed verification {attempts} times "
                                     f"({problem}); the upstream file or the connection is damaged")
            records.append({"path": remote.path, "size": local.stat().st_size, "sha256": sha or sha256_of(local)})
        _replace_symlink(directory / "model.gguf", local_paths[0])
        if mmproj:
            _replace_symlink(directory / "mmproj.gguf", local_paths[-1])
        marker = {"ref": str(ref), "repo": ref.repo, "quant": ref.quant, "revision": ref.revision,
                  "files": records, "verified_at": time.time()}
        tmp = directory / f".{MARKER}.tmp"
        tmp.write_text(json.dumps(marker, indent=2))
        os.replace(tmp, directory / MARKER)
        entry = self.entry(name)
        assert entry is not None
        return entry

    @staticmethod
    def _verify(path: Path, size: int | None, sha256: str | None) -> str | None:
        if not path.exists():
            return "the file is missing after download"
        actual = path.stat().st_size
        if size is not None and actual != size:
            return f"size {actual} bytes, expected {size}"
        if sha256 and sha256_of(path) != sha256.lower():
            return "sha256 mismatch"
        try:
            check_gguf(path)
        except GGUFInvalid as exc:
            return f"not a valid GGUF: {exc}"
        return None

    def _check_disk_space(self, files_dir: Path, wanted: list[RemoteFile]) -> None:
        needed = 0
        for remote in wanted:
            local = files_dir / remote.path
            have = local.stat().st_size if local.exists() else 0
            needed += max((remote.size or 0) - have, 0)
        free = shutil.disk_usage(files_dir).free
        if needed + _DISK_MARGIN > free:
            raise StoreError(f"not enough disk space in {self.root}: the download needs {needed / 2**30:.2f} GiB "
                             f"and {free / 2**30:.2f} GiB are free; free some space or set BERTH_HOME elsewhere")
