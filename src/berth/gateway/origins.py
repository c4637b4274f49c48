"""Which web pages may use berth through a visitor's browser: berth's own (the dashboard), and the origins the
config lists in `allowedOrigins` (none by default).

A page of any site can make a browser send requests to berth: an `<img>` or a form needs nothing, `fetch()` with
a body a form could send (text/plain, a form encoding) is sent without asking first. CORS only decides whether
that page may read the answer, after the request has run, so berth refuses what a browser says comes from
another page before anything runs: its `Origin`, and for requests without one `Sec-Fetch-Site`. Following a
link to berth (a top-level GET) is not refused. Model servers never see `Origin`, and their own
`Access-Control-*` headers never reach the browser: berth alone answers CORS, for the listed origins, and
never with credentials.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

ALLOWED_METHODS = "GET, POST, PUT, DELETE, OPTIONS"
ALLOWED_HEADERS = "Authorization, Content-Type, X-Api-Key"  # besides those a preflight asks for
PREFLIGHT_MAX_AGE = "600"  # seconds a browser may reuse an answered preflight
_DEFAULT_PORTS = {"http": 80, "https": 443}


def foreign_page(headers: Mapping[str, str], method: str) -> str | None:
    """Where a request comes from, when a browser sent it for a page of another origin: that origin ("" when
    the browser does not say which). None for berth's own pages, an address typed or a link followed, and
    every client that is not a browser (they send neither header)."""
    origin = headers.get("Origin")
    if origin is not None and not same_origin(origin, headers.get("Host", "")):
        return origin
    if headers.get("Sec-Fetch-Site") in ("cross-site", "same-site") and not _followed_link(headers, method):
        return origin or ""  # an <img>, a <script>, a frame: no Origin, but the browser says whose page it was
    return None


def from_browser(headers: Mapping[str, str]) -> bool:
    """Whether a browser sent the request: browsers add `Origin` to every POST a page makes (same origin or
    not; "null" where they hide it) and `Sec-Fetch-*` to every request on secure and local origins, and a
    page cannot remove either. curl, SDKs and other programs send neither."""
    return "Origin" in headers or any(name.lower().startswith("sec-fetch-") for name in headers)


def same_origin(origin: str, host_header: str) -> bool:
    """Whether a page of `origin` is berth itself as reached under `host_header` (the dashboard)."""
    parts = urlsplit(origin.strip().lower())
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return False  # "null" (a sandboxed frame, a file), or nonsense
    try:
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
        reached = urlsplit(f"{parts.scheme}://{host_header.strip().lower()}")
        return reached.hostname == parts.hostname and (reached.port or _DEFAULT_PORTS[parts.scheme]) == port
    except ValueError:  # a port that is not a number
        return False


def allowed(origin: str, listed: list[str]) -> bool:
    """Whether the config lets pages of `origin` in (`listed` as the config holds them: lower case)."""
    return "*" in listed or origin.strip().lower().rstrip("/") in listed


def answer_headers(origin: str) -> dict[str, str]:
    """What an answer to a listed origin carries: that origin allowed, no credentials."""
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}


def preflight_headers(origin: str, asked_headers: str) -> dict[str, str]:
    """The answer to a listed origin's preflight: the methods berth takes and the headers the page asks to send
    (its OpenAI SDK sends some of its own), besides berth's."""
    asked = [h.strip() for h in asked_headers.split(",") if h.strip().replace("-", "").isalnum()]
    return {**answer_headers(origin), "Access-Control-Allow-Methods": ALLOWED_METHODS,
            "Access-Control-Allow-Headers": ", ".join([ALLOWED_HEADERS, *asked]),
            "Access-Control-Max-Age": PREFLIGHT_MAX_AGE}


def is_preflight(method: str, headers: Mapping[str, str]) -> bool:
    return method == "OPTIONS" and "Access-Control-Request-Method" in headers


def _followed_link(headers: Mapping[str, str], method: str) -> bool:
    """A top-level GET navigation: a link or a bookmark (not a frame, which could hide berth's page)."""
    return (method in ("GET", "HEAD") and headers.get("Sec-Fetch-Mode") == "navigate"
            and headers.get("Sec-Fetch-Dest") == "document")
