"""Fetching the http(s) image, audio and video URLs of a request, so that model servers never fetch one.

llama-server (build 11434, `handle_media` in tools/server/server-common.cpp) downloads such a URL itself:
any address (loopback, the private network, a cloud's metadata service at 169.254.169.254), redirects
followed, 10 MB and a 10 s read timeout per read, inside the request's handler. berth fetches instead, within
`remoteImages:` (size, whole-fetch time, public addresses only unless allowed), and sends the bytes inline.

The address check holds for every connection: a name is checked on what it resolves to, by the resolver
the connection then uses (so a name that resolves anew to another address cannot slip past), an address
written in the URL before the request, and every redirect is followed here, hop by hop, under the same
checks.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from types import TracebackType

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from berth.config import RemoteImages
from berth.core.errors import BodyTooLarge, MediaUrlFailed, MediaUrlRefused
from berth.core.units import format_bytes

MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 64 * 1024
_UNTYPED = ("", "application/octet-stream", "binary/octet-stream")
# prefixes that carry an IPv4 address inside an IPv6 one, and where (NAT64, 6to4)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")
_ALLOW_HINT = "set remoteImages.allowPrivateAddresses: true in the config if this server should reach it"


def is_public(address: str) -> bool:
    """Whether an IP address is on the public internet: not loopback, private (RFC 1918, unique local),
    link-local (169.254.169.254, cloud metadata), shared (100.64/10), multicast, reserved or unspecified;
    an IPv4 address inside an IPv6 one (mapped, NAT64, 6to4) is judged as itself."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        elif ip in _SIX_TO_FOUR:
            ip = ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF)
    return ip.is_global and not ip.is_multicast


class PrivateAddress(OSError):
    """A host name that resolves to an address that is not public."""

    def __init__(self, host: str, address: str) -> None:
        super().__init__(f"{host} resolves to {address}")
        self.host, self.address = host, address


class _PublicOnly(AbstractResolver):
    """Resolves as usual, and refuses a name when any of its addresses is not public; the connection is
    made to the addresses checked here."""

    def __init__(self) -> None:
        self._resolver = DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET,
                      ) -> list[ResolveResult]:
        answers = await self._resolver.resolve(host, port, family)
        for answer in answers:
            if not is_public(answer["host"]):
                raise PrivateAddress(host, answer["host"])
        return answers

    async def close(self) -> None:
        await self._resolver.close()


def shown(url: str) -> str:
    """A URL for an error message: without credentials, and not endlessly long."""
    try:
        text = str(URL(url).with_user(None))
    except (ValueError, TypeError):
        text = url
    return text if len(text) <= 200 else text[:200] + "..."


class RemoteMedia:
    """Fetches one request's media URLs (`async with`), within `settings` and `room`: the bytes the body may
    still grow by under maxBodyBytes once they are inlined as base64."""

    def __init__(self, settings: RemoteImages, room: int, max_body_bytes: int) -> None:
        self.settings = settings
        self.room = room
        self.max_body_bytes = max_body_bytes
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> RemoteMedia:
        resolver = None if self.settings.allow_private_addresses else _PublicOnly()
        connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False)
        # no proxy from the environment (a proxy would make the connection, unchecked), and no decompression:
        # a small compressed body must not grow past the limits in memory
        self._session = aiohttp.ClientSession(
            connector=connector, trust_env=False, auto_decompress=False,
            headers={"User-Agent": "berth", "Accept-Encoding": "identity"})
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()

    async def fetch(self, url: str, kind: str) -> tuple[str, bytes]:
        """(media type, bytes) of `url`, an `kind` (image, audio, video); MediaUrlRefused, MediaUrlFailed or
        BodyTooLarge say why not."""
        timeout = self.settings.timeout
        try:
            async with asyncio.timeout(timeout):
                media_type, data = await self._follow(url, kind)
        except TimeoutError:
            raise MediaUrlFailed(f"{shown(url)} did not arrive within remoteImages.timeout ({timeout:g} s); "
                                 "send the file inline (a base64 data URL) or raise the timeout") from None
        self.room -= (len(data) + 2) // 3 * 4
        return media_type, data

    async def _follow(self, url: str, kind: str) -> tuple[str, bytes]:
        assert self._session is not None, "use RemoteMedia with `async with`"
        target = self._checked(url, url)
        for _ in range(MAX_REDIRECTS + 1):
            try:
                async with self._session.get(target, allow_redirects=False) as response:
                    location = response.headers.get("Location")
                    if response.status in _REDIRECTS and location:
                        target = self._checked(str(response.url.join(URL(location))), url)
                        continue
                    if not 200 <= response.status < 300:
                        raise MediaUrlFailed(f"{shown(url)} answered HTTP {response.status}; send a URL that "
                                             f"serves the {kind}, or the file inline (a base64 data URL)")
                    return self._media_type(response, url, kind), await self._read(response, url)
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, PrivateAddress):
                    raise MediaUrlRefused(f"{shown(url)}: {exc.os_error}, which is not a public address; berth "
                                          f"fetches media only from public addresses ({_ALLOW_HINT})") from None
                raise MediaUrlFailed(f"cannot fetch {shown(url)}: {exc}") from None
            except (aiohttp.ClientError, OSError, ValueError) as exc:
                raise MediaUrlFailed(f"cannot fetch {shown(url)}: {exc or type(exc).__name__}") from None
        raise MediaUrlFailed(f"{shown(url)} redirected more than {MAX_REDIRECTS} times; send the final URL")

    def _checked(self, target: str, asked: str) -> URL:
        """`target` as a URL berth may request: http or https, and an address written in it public."""
        try:
            parsed = URL(target)
        except (ValueError, TypeError):
            raise MediaUrlFailed(f"{shown(asked)} is not a URL") from None
        if parsed.scheme not in ("http", "https") or not parsed.raw_host:
            raise MediaUrlRefused(f"{shown(target)}: berth fetches only http and https URLs with a host; send "
                                  "the file inline as a base64 data URL")
        host = parsed.raw_host
        try:
            public = is_public(host)
        except ValueError:  # a name: the resolver checks what it resolves to
            return parsed
        if not public and not self.settings.allow_private_addresses:
            via = "" if target == asked else f" (redirected from {shown(asked)})"
            raise MediaUrlRefused(f"{shown(target)}{via}: {host} is not a public address; berth fetches media "
                                  f"only from public addresses ({_ALLOW_HINT})")
        return parsed

    def _media_type(self, response: aiohttp.ClientResponse, url: str, kind: str) -> str:
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise MediaUrlFailed(f"{shown(url)} came compressed ({encoding}) though berth asked for it as is")
        declared = response.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if declared.startswith(kind + "/"):
            return declared
        if declared in _UNTYPED:  # llama.cpp reads the format from the bytes; the data URL needs the family
            return f"{kind}/octet-stream"
        raise MediaUrlFailed(f"{shown(url)} is {declared}, not {'an' if kind[0] in 'aeiou' else 'a'} {kind}; send "
                             f"the URL of the {kind} itself")

    async def _read(self, response: aiohttp.ClientResponse, url: str) -> bytes:
        limit = min(self.settings.max_bytes, max(self.room, 0) // 4 * 3)
        declared = response.content_length
        data = bytearray()
        if declared is None or declared <= limit:
            async for chunk in response.content.iter_chunked(_CHUNK):
                data += chunk
                if len(data) > limit:
                    break
            else:
                return bytes(data)
        size = f"{format_bytes(declared)}" if declared is not None and declared > limit else \
            f"more than {format_bytes(limit)}"
        if limit < self.settings.max_bytes:
            raise BodyTooLarge(f"{shown(url)} is {size}: inlined, it would make the request larger than "
                               f"maxBodyBytes ({format_bytes(self.max_body_bytes)}); send smaller files or fewer "
                               "per request, or raise maxBodyBytes in the config")
        raise MediaUrlFailed(f"{shown(url)} is {size}, over remoteImages.maxBytes "
                             f"({format_bytes(self.settings.max_bytes)}); send a smaller file or raise the limit")
