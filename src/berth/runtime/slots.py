"""Saving a model's KV slots before a planned stop and restoring them after a start.

Driven by the model's supervisor task (`ModelProcess`), over llama-server's
own slot API (`GET /slots`, `POST /slots/{id}?action=save|restore`). Nothing
here may fail a start or hold up a stop: every problem is logged and counted.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from berth.core.paths import PRIVATE_DIR, private_dir
from berth.engine.slots import SlotPlan

SAVE_BUDGET_SECONDS = 10.0
_RUNNING_MARKER = "running"  # present while a process uses the directory; left behind by a crash
_SETTINGS_FILE = "settings.json"


def _slot_file(slot_id: int) -> str:
    return f"slot-{slot_id}.bin"


class SlotKeeper:
    def __init__(self, model_id: str, plan: SlotPlan, base_url: str, session: aiohttp.ClientSession,
                 log: Callable[[str], None], metrics=None, headers: dict[str, str] | None = None) -> None:
        self.model_id, self.plan, self.base_url = model_id, plan, base_url
        self._session, self._log, self._metrics = session, log, metrics
        self._headers = headers or {}  # the server's key

    # -- around the start ---------------------------------------------------------------

    def prepare(self) -> None:
        """Create this settings' directory; discard saves made under other settings."""
        directory = self.plan.directory
        if self.plan.model_root.is_dir():
            for other in self.plan.model_root.iterdir():
                if other.is_dir() and other != directory:
                    self._log(f"discarding saved slots in {other.name}: made with other launch settings "
                              f"({_settings_difference(other, self.plan.settings)})")
                    shutil.rmtree(other, ignore_errors=True)
        private_dir(directory)
        for own in (self.plan.slots_root, self.plan.model_root, directory):  # made 0700 by an older berth or not
            own.chmod(PRIVATE_DIR)
        (directory / _SETTINGS_FILE).write_text(json.dumps(self.plan.settings, indent=2))
        saved = sorted(directory.glob("slot-*.bin"))
        if (directory / _RUNNING_MARKER).exists() and saved:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(max(p.stat().st_mtime for p in saved)))
            self._log(f"the previous run ended without a planned stop; restoring the older save from {when}")

    def mark_running(self) -> None:
        """Left in place by a crash, so the next start can say its restore is older."""
        (self.plan.directory / _RUNNING_MARKER).touch()

    async def restore(self) -> int:
        """Restore every saved slot; returns the tokens restored."""
        restored = 0
        for path in sorted(self.plan.directory.glob("slot-*.bin")):
            slot_id = int(path.stem.split("-")[1])
            result = await self._slot_action(slot_id, "restore", path.name)
            if result is None:
                self._count("restores", "failed")
                continue
            tokens = int(result.get("n_restored", 0))
            restored += tokens
            path.touch()  # least recently used goes first when the disk cap bites
            self._count("restores", "ok")
            if self._metrics is not None:
                self._metrics.kv_bytes.labels(self.model_id, "restored").inc(int(result.get("n_read", 0)))
        if restored:
            self._log(f"restored {restored} cached tokens from saved slots")
        return restored

    # -- before a planned stop ------------------------------------------------------------

    async def save(self, budget: float = SAVE_BUDGET_SECONDS) -> None:
        """Save every slot that holds tokens, within `budget` seconds; never raises."""
        try:
            await asyncio.wait_for(self._save_all(), budget)
        except asyncio.TimeoutError:
            self._log(f"saving slots took longer than {budget:g}s; stopping without the rest")
            self._count("saves", "failed")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            self._log(f"saving slots failed: {exc!r}")
            self._count("saves", "failed")
        (self.plan.directory / _RUNNING_MARKER).unlink(missing_ok=True)
        await asyncio.to_thread(self.enforce_disk_caps)  # walks every model's saves

    async def _save_all(self) -> None:
        async with self._session.get(self.base_url + "/slots", timeout=aiohttp.ClientTimeout(total=5),
                                     headers=self._headers) as resp:
            if resp.status != 200:
                raise ValueError(f"GET /slots answered HTTP {resp.status}")
            slots = await resp.json(content_type=None)
        for slot in slots:
            if int(slot.get("n_prompt_tokens") or 0) <= 0:
                continue
            slot_id = int(slot["id"])
            partial = f"{_slot_file(slot_id)}.partial"
            result = await self._slot_action(slot_id, "save", partial)
            if result is None:
                self._count("saves", "failed")
                (self.plan.directory / partial).unlink(missing_ok=True)
                continue
            os.replace(self.plan.directory / partial, self.plan.directory / _slot_file(slot_id))
            self._count("saves", "ok")
            if self._metrics is not None:
                self._metrics.kv_bytes.labels(self.model_id, "saved").inc(int(result.get("n_written", 0)))
            self._log(f"saved slot {slot_id} ({result.get('n_saved', '?')} tokens)")

    async def _slot_action(self, slot_id: int, action: str, filename: str) -> dict | None:
        url = f"{self.base_url}/slots/{slot_id}?action={action}"
        try:
            async with self._session.post(url, json={"filename": filename}, headers=self._headers,
                                          timeout=aiohttp.ClientTimeout(total=30)) as resp:
                body = await resp.text()
                if resp.status != 200:
                    self._log(f"slot {slot_id} {action} answered HTTP {resp.status}: {body[:200]}")
                    return None
                return json.loads(body)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            self._log(f"slot {slot_id} {action} failed: {exc!r}")
            return None

    def _count(self, what: str, outcome: str) -> None:
        if self._metrics is not None:
            getattr(self._metrics, f"kv_{what}").labels(self.model_id, outcome).inc()

    # -- disk -----------------------------------------------------------------------------

    def enforce_disk_caps(self) -> None:
        """Delete least recently used slot files beyond the per-model and total caps."""
        for root, cap in ((self.plan.model_root, self.plan.per_model_max_bytes),
                          (self.plan.slots_root, self.plan.total_max_bytes)):
            files = sorted(root.rglob("slot-*.bin"), key=lambda p: p.stat().st_mtime)
            total = sum(p.stat().st_size for p in files)
            while files and total > cap:
                oldest = files.pop(0)
                total -= oldest.stat().st_size
                oldest.unlink()
                self._log(f"deleted saved slot {oldest.parent.parent.name}/{oldest.name}: over the {cap} byte cap")


def _settings_difference(directory: Path, current: dict) -> str:
    try:
        old = json.loads((directory / _SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        return "settings unknown"
    changed = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in current.items() if old.get(k) != v]
    return ", ".join(changed) or "same settings, older layout"
