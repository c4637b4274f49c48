"""Read-ahead into the page cache on a real file: dropped pages come back, and nothing is read for a
file that the host could not hold."""

from __future__ import annotations

import os
from pathlib import Path

from berth.runtime.pagecache import PageWarmer, cached_bytes, drop, launch_files, read_ahead
from tests.support.harness import wait_until

MiB = 1024**2


def written(path: Path, size: int) -> Path:
    with open(path, "wb") as fh:
        fh.write(os.urandom(size))
        fh.flush()
        os.fsync(fh.fileno())  # dirty pages would stay cached whatever is asked
    return path


def test_read_ahead_brings_a_dropped_file_back_into_the_cache(tmp_path):
    model = written(tmp_path / "model.gguf", 32 * MiB)
    drop(model)
    assert cached_bytes(model) < 4 * MiB
    assert read_ahead([model]) == 32 * MiB
    wait_until(lambda: cached_bytes(model) == 32 * MiB, 30, "the kernel to read the file")


def test_a_file_the_host_cannot_hold_is_not_read_at_all(tmp_path):
    model = written(tmp_path / "model.gguf", 16 * MiB)
    drop(model)
    files, missing, skip = PageWarmer(lambda: 20 * MiB, headroom_bytes=8 * MiB).plan([model])
    assert files == [] and missing > 12 * MiB
    assert skip is not None and "more than the 0.0 GiB the host can hold" in skip
    PageWarmer(lambda: 20 * MiB, headroom_bytes=8 * MiB).warm("m", lambda: [model], "test").join(30)
    assert cached_bytes(model) < 4 * MiB  # nothing was asked for
    warmer = PageWarmer(lambda: 64 * MiB, headroom_bytes=8 * MiB)
    assert warmer.plan([model])[0] == [model]
    warmer.warm("m", lambda: [model], "test").join(30)
    wait_until(lambda: cached_bytes(model) == 16 * MiB, 30, "the kernel to read the file")
    assert warmer.plan([model])[2] == "already cached"


def test_the_files_a_start_reads_include_every_split_part_the_projector_and_the_draft():
    argv = ["/opt/llama-server", "-m", "/m/q-00001-of-00003.gguf", "--mmproj", "/m/proj.gguf",
            "-md", "/m/draft.gguf", "--port", "1"]
    assert launch_files(argv) == [Path("/m/draft.gguf"), Path("/m/proj.gguf"), Path("/m/q-00001-of-00003.gguf"),
                                  Path("/m/q-00002-of-00003.gguf"), Path("/m/q-00003-of-00003.gguf")]
    assert launch_files(["/opt/vllm", "serve", "x"]) == []
