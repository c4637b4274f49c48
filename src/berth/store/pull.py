"""Pulling models from a Hugging Face compatible hub into the store.

The `huggingface_hub` client lists the repo and builds URLs, auth headers and
the HTTP session, so `HF_ENDPOINT`, `HF_TOKEN` and `HF_HUB_OFFLINE` behave as
everywhere else. The bytes are fetched here with HTTP ranges into a
`.partial` file, because the client's own download restarts from zero after an
interruption; berth resumes, retries with exponential backoff, verifies, and
only then writes the completion marker.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from berth.core.paths import private_dir
from berth.core.refs import ModelRef
from berth.store.store import BadSelection, ModelStore, NotInStore, RemoteFile, StoreEntry, StoreError, contained_path
from berth.store.store import select_mmproj, select_model_files


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    first_delay: float = 1.0  # seconds; doubles after each failure

    def delays(self):
        for attempt in range(self.attempts - 1):
            yield self.first_delay * 2**attempt


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _is_transient(exc: BaseException) -> bool:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        return status is None or status >= 500 or status == 429
    return isinstance(exc, (httpx2.TransportError, ConnectionError, TimeoutError))


def _with_retries(what: str, action, retry: RetryPolicy):
    delays = retry.delays()
    while True:
        try:
            return action()
        except Exception as exc:  # noqa: BLE001 - classified just below
            if not _is_transient(exc):
                raise
            delay = next(delays, None)
            if delay is None:
                raise StoreError(f"{what} failed after {retry.attempts} attempts: {exc}; "
                                 "check the network or HF_ENDPOINT and run the pull again (it resumes)") from None
            time.sleep(delay)


def list_repo(ref: ModelRef, retry: RetryPolicy) -> tuple[str, list[RemoteFile]]:
    """(commit, files with sizes and LFS sha256) of the repo at the ref's revision."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = _with_retries(f"listing {ref.repo}",
                             lambda: HfApi().model_info(ref.repo, revision=ref.revision, files_metadata=True), retry)
    except RevisionNotFoundError:
        raise BadSelection(f"{ref.repo} has no revision {ref.revision!r}") from None
    except RepositoryNotFoundError:
        raise BadSelection(f"repository {ref.repo} was not found (or needs HF_TOKEN for access)") from None
    files = []
    for sibling in info.siblings or []:
        lfs = sibling.lfs
        files.append(RemoteFile(sibling.rfilename, sibling.size if sibling.size is not None else
                                (lfs.size if lfs else None), lfs.sha256 if lfs else None))
    return info.sha, files


class PullCancelled(StoreError):
    """The pull was abandoned (the model's start was cancelled, or berth is stopping)."""


def _check_cancel(cancel: threading.Event | None, what: str) -> None:
    if cancel is not None and cancel.is_set():
        raise PullCancelled(f"{what} was cancelled")


class IncompleteDownload(ConnectionError):
    """The connection ended before the whole file arrived (transient: the next attempt resumes)."""


def download_file(ref: ModelRef, remote: RemoteFile, files_dir: Path, commit: str, retry: RetryPolicy,
                  progress=None, cancel: threading.Event | None = None) -> None:
    """Fetch one file with HTTP ranges into `<file>.partial`, resuming across attempts and runs."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    target = contained_path(files_dir, remote.path, ref.repo)
    partial = target.with_name(target.name + ".partial")
    private_dir(target.parent)
    if target.exists() and (remote.size is None or target.stat().st_size == remote.size):
        return
    url = hf_hub_url(ref.repo, remote.path, revision=commit)
    # rich's Progress keeps `sha256` as a field of the task; other progress sinks (Ollama's pull) show it
    task = progress.add_task(remote.path, total=remote.size, sha256=remote.sha256) if progress is not None else None

    def attempt() -> None:
        _check_cancel(cancel, f"downloading {remote.path}")
        have = partial.stat().st_size if partial.exists() else 0
        if remote.size is not None and have > remote.size:
            partial.unlink()
            have = 0
        if task is not None:
            progress.update(task, completed=have)
        headers = build_hf_headers()
        headers["Accept-Encoding"] = "identity"  # sizes and ranges count stored bytes
        if have:
            headers["Range"] = f"bytes={have}-"
        with get_session().stream("GET", url, headers=headers, follow_redirects=True, timeout=30) as resp:
            if not (resp.status_code == 416 and have == remote.size):
                hf_raise_for_status(resp)
                # 206: the rest of the file; 200: the server ignored the range, so start over
                with open(partial, "ab" if resp.status_code == 206 else "wb") as fh:
                    for chunk in resp.iter_bytes():  # as it arrives: progress and resume points stay fine-grained
                        _check_cancel(cancel, f"downloading {remote.path}")  # the .partial file stays for a resume
                        fh.write(chunk)
                        if task is not None:
                            progress.advance(task, len(chunk))
        got = partial.stat().st_size
        if remote.size is not None and got < remote.size:
            raise IncompleteDownload(f"{remote.path}: got {got} of {remote.size} bytes")
        os.replace(partial, target)

    _with_retries(f"downloading {remote.path}", attempt, retry)


def pull(store: ModelStore, ref: ModelRef, *, name: str | None = None, mmproj: bool | None = False,
         sha256: str | None = None, retry: RetryPolicy = RetryPolicy(), progress=None,
         cancel: threading.Event | None = None) -> StoreEntry:
    """Make `ref` available in the store (downloading only what is missing) and return its entry.

    `mmproj`: True requires the repo's projector, None takes it when the repo has one.
    """
    name = name or ref.default_name
    with store.lock(name, cancel):
        existing = store.entry(name)
        if existing is not None and existing.ref == str(ref) and (existing.mmproj_path or mmproj is not True):
            return existing
        if hub_offline():
            raise NotInStore(f"model {name!r} ({ref}) is not in the store and HF_HUB_OFFLINE is set; "
                             f"run `berth pull {ref}` while online")
        commit, listing = list_repo(ref, retry)
        model_files = select_model_files(ref, listing)
        if sha256 and len(model_files) != 1:
            raise BadSelection(f"--sha256 names one file, but {ref} has {len(model_files)} parts; "
                               "drop --sha256 (each part is checked against the hub's hash)")
        projector = select_mmproj(listing, model_files[0]) if mmproj is not False else None
        if mmproj is True and projector is None:
            raise BadSelection(f"{ref.repo} has no mmproj*.gguf projector; pull without --mmproj")

        def fetch(remote: RemoteFile, files_dir: Path) -> None:
            download_file(ref, remote, files_dir, commit, retry, progress, cancel)

        return store.install(name, ref, model_files, projector, fetch, expected_sha256=sha256)
