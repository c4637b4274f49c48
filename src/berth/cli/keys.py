"""`berth key`: hashes for the config's `apiKeys` (`keyHash:`), so a config need not hold a key itself."""

from __future__ import annotations

import sys

import click

from berth.cli.common import fail
from berth.core.keyhash import format_hash, key_digest, new_key


@click.group()
def key() -> None:
    """Make API keys and their hashes for apiKeys."""


@key.command("hash")
@click.argument("value", required=False)
def hash_(value: str | None) -> None:
    """Print the keyHash of a key: from the argument, else read from stdin (a terminal is asked without
    echo, which keeps the key out of the shell's history)."""
    if value is None:
        value = click.prompt("key", hide_input=True) if sys.stdin.isatty() else sys.stdin.readline()
        value = value.rstrip("\r\n")
    if not value.strip():
        fail("the key is empty; pass a key (argument or stdin), or make one with `berth key new`")
    if value != value.strip():
        fail("the key starts or ends with white space, which a client's header would not carry; remove it")
    click.echo(format_hash(key_digest(value)))


@key.command("new")
@click.option("--name", default="", help="Also print an apiKeys entry for this name.")
def new(name: str) -> None:
    """Make a random key; print it (hand it to its user: berth keeps only the hash) and its keyHash."""
    made = new_key()
    digest = format_hash(key_digest(made))
    click.echo(f"key:     {made}")
    click.echo(f"keyHash: {digest}")
    if name:
        click.echo(f"\napiKeys:\n  - name: {name}\n    keyHash: {digest}\n    scopes: [inference]")
