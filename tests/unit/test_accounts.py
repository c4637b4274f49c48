"""A key's limits and usage, with a clock the test sets, and the usage database on disk."""

from __future__ import annotations

import stat

import pytest

from berth.config import ApiKey, KeyLimits
from berth.core.errors import KeyLimitReached
from berth.gateway.accounts import KeyAccounts
from berth.gateway.ledger import Outcome, RequestLedger
from berth.gateway.metrics import Metrics
from berth.gateway.usagedb import Tally, UsageStore

NOON = 1_750_000_000 - 1_750_000_000 % 86400 + 12 * 3600  # 12:00 UTC on some day


class Clock:
    def __init__(self, now: float = NOON) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def accounts_at(tmp_path, clock: Clock) -> tuple[KeyAccounts, RequestLedger]:
    metrics = Metrics()
    accounts = KeyAccounts(metrics, UsageStore(tmp_path / "usage.sqlite3"), clock)
    return accounts, RequestLedger(metrics, keep=100, on_end=accounts.finished)


def key(**limits: int) -> ApiKey:
    return ApiKey("alice", b"\0" * 32, limits=KeyLimits(**limits))


def answered(ledger: RequestLedger, accounts: KeyAccounts, who: ApiKey, model: str = "m", prompt: int = 0,
             completion: int = 0, status: int = 200) -> None:
    record = ledger.begin(model, "/v1/chat/completions", who.name)
    accounts.admit(who, record)
    ledger.first_byte(record, status)
    ledger.read_usage(record, b'{"usage": {"prompt_tokens": %d, "completion_tokens": %d}}' % (prompt, completion),
                      restore_hit=False)
    ledger.end(record, Outcome.ANSWERED)


async def test_requests_per_minute_is_a_sliding_window_with_retry_after(tmp_path):
    clock = Clock()
    accounts, ledger = accounts_at(tmp_path, clock)
    alice = key(requests_per_minute=2)
    answered(ledger, accounts, alice)
    clock.now += 20
    answered(ledger, accounts, alice)
    clock.now += 10
    with pytest.raises(KeyLimitReached) as caught:
        accounts.admit(alice, ledger.begin("m", "/v1/completions", "alice"))
    assert caught.value.status == 429 and caught.value.code == "key_requests_per_minute"
    assert caught.value.retry_after == 30  # the first request leaves the window 60 s after it came
    clock.now += 30
    answered(ledger, accounts, alice)  # one slot free again


async def test_concurrency_counts_requests_until_they_end(tmp_path):
    accounts, ledger = accounts_at(tmp_path, Clock())
    alice = key(concurrency=1)
    first = ledger.begin("m", "/v1/completions", "alice")
    accounts.admit(alice, first)
    with pytest.raises(KeyLimitReached) as caught:
        accounts.admit(alice, ledger.begin("m", "/v1/completions", "alice"))
    assert caught.value.code == "key_concurrency" and caught.value.retry_after == 1
    ledger.abandon(first)  # however it ends, it no longer counts
    accounts.admit(alice, ledger.begin("m", "/v1/completions", "alice"))


async def test_tokens_per_day_refuses_once_reached_until_midnight_utc(tmp_path):
    clock = Clock()
    accounts, ledger = accounts_at(tmp_path, clock)
    alice = key(tokens_per_day=100)
    answered(ledger, accounts, alice, prompt=60, completion=30)
    answered(ledger, accounts, alice, prompt=10, completion=5)  # 90 < 100: runs, and crosses the limit
    with pytest.raises(KeyLimitReached) as caught:
        accounts.admit(alice, ledger.begin("m", "/v1/completions", "alice"))
    assert caught.value.code == "key_tokens_per_day" and caught.value.retry_after == 12 * 3600
    assert accounts.tokens_today("alice") == 105
    clock.now += 12 * 3600  # midnight: a new day
    answered(ledger, accounts, alice)


async def test_usage_is_counted_per_key_and_model_and_survives_a_restart(tmp_path):
    clock = Clock()
    accounts, ledger = accounts_at(tmp_path, clock)
    await accounts.open()
    alice, bob = key(tokens_per_day=1000), ApiKey("bob", b"\1" * 32)
    answered(ledger, accounts, alice, "m", 10, 3)
    answered(ledger, accounts, alice, "m", 7, 2)
    answered(ledger, accounts, alice, "n", 1, 1, status=500)
    answered(ledger, accounts, bob, "m", 5, 5)
    ledger.abandon(ledger.begin("m", "/v1/completions"))  # no key: not counted per key
    await accounts.close()

    again, _ = accounts_at(tmp_path, clock)
    await again.open()
    assert again.tokens_today("alice") == 24  # read back for tokensPerDay
    usage = await again.usage(NOON - 3600)
    by_key = {entry["key"]: entry for entry in usage["keys"]}
    assert set(by_key) == {"alice", "bob"}
    alice_usage = by_key["alice"]
    assert (alice_usage["requests"], alice_usage["errors"], alice_usage["prompt_tokens"],
            alice_usage["completion_tokens"]) == (3, 1, 18, 6)
    assert [(m["model"], m["requests"], m["prompt_tokens"]) for m in alice_usage["models"]] == [("m", 2, 17), ("n", 1, 1)]
    assert alice_usage["hours"] == [{"hour": NOON, "requests": 3, "errors": 1, "prompt_tokens": 18,
                                     "completion_tokens": 6}]
    assert (await again.usage(NOON - 3600, "bob"))["keys"][0]["prompt_tokens"] == 5
    assert (await again.usage(NOON + 3600))["keys"] == []  # later hours only
    await again.close()
    assert stat.S_IMODE((tmp_path / "usage.sqlite3").stat().st_mode) == 0o600


def test_the_database_keeps_at_most_its_rows_and_drops_the_oldest_hours(tmp_path):
    store = UsageStore(tmp_path / "usage.sqlite3", keep_seconds=10 * 3600, max_rows=5)
    store.add({("k", "m", NOON + h * 3600): Tally(1, 0, 1, 1) for h in range(4)}, now=NOON)
    store.add({("k", "m", NOON + h * 3600): Tally(1, 0, 1, 1) for h in range(4, 8)}, now=NOON + 7 * 3600)
    assert sorted(hour for _, _, hour in store.read(0)) == [NOON + h * 3600 for h in range(3, 8)]
    store.add({("k", "m", NOON + 20 * 3600): Tally(1, 0, 1, 1)}, now=NOON + 20 * 3600)
    assert sorted(hour for _, _, hour in store.read(0)) == [NOON + 20 * 3600]  # the rest is older than 10 h
    store.close()


def test_the_per_key_series_name_the_key_never_its_secret(tmp_path):
    accounts, ledger = accounts_at(tmp_path, Clock())
    alice = ApiKey("alice", bytes.fromhex("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"))
    answered(ledger, accounts, alice, prompt=4, completion=2)
    text = ledger.metrics.render().decode()
    assert 'berth_key_requests_total{key="alice",model="m"} 1.0' in text
    assert 'berth_key_tokens_total{key="alice",kind="prompt",model="m"} 4.0' in text
    assert 'berth_key_requests_in_flight{key="alice"} 0.0' in text
    assert "9f86d0" not in text
