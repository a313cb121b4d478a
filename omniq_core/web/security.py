"""Who may see and act on the dashboard: Host check, token login, CSRF, read-only mode.

- Bound to a loopback address, only requests naming a loopback Host are served: a web
  page elsewhere cannot reach it by DNS rebinding. Any other address needs a token.
- With a token, a browser logs in once through a form (never a URL that ends up in
  logs or history) and holds an HttpOnly, SameSite=Strict cookie; scripts send
  `Authorization: Bearer TOKEN`.
- Every change is a POST carrying a CSRF token (an HMAC of the browser's session
  cookie with a per-process secret) from a page of the same origin; a Bearer request
  (a script, which no browser sends on its own) needs none.
- Actions are refused unless the dashboard was started with --allow-actions.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from omniq.errors import ConfigError

SESSION_COOKIE = "omniq_session"
AUTH_COOKIE = "omniq_auth"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf"
MIN_TOKEN = 16  # characters; a shorter token is refused at start
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
# Reachable without a login: the login page itself and what it needs to render.
PUBLIC_PATHS = frozenset({"/login", "/static/style.css"})
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_loopback(host: str) -> bool:
    name = host.strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass
class Guard:
    """The dashboard's access rules; one per server."""

    host: str
    token: str | None = None
    allow_actions: bool = False
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))

    def __post_init__(self) -> None:
        if self.token is not None and len(self.token) < MIN_TOKEN:
            raise ConfigError(
                f"the dashboard token must be at least {MIN_TOKEN} characters "
                "(e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(24))')"
            )
        if self.token is None and not is_loopback(self.host):
            raise ConfigError(
                f"the dashboard bound to {self.host} needs a token: set OMNIQ_DASHBOARD_TOKEN "
                "(or --token, dashboard_token); without one it serves 127.0.0.1 only"
            )
        self.local_only = is_loopback(self.host)

    # --- credentials ------------------------------------------------------------------------
    def auth_value(self) -> str:
        """The login cookie's value: derived from the token, never the token itself."""
        assert self.token is not None
        return hmac.new(self.token.encode(), b"omniq-dashboard-login", hashlib.sha256).hexdigest()

    def token_matches(self, given: str) -> bool:
        return self.token is not None and _same(given, self.token)

    def authenticated(self, request: web.Request) -> bool:
        if self.token is None:
            return True
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer ") and self.token_matches(header[7:].strip()):
            return True
        cookie = request.cookies.get(AUTH_COOKIE, "")
        return bool(cookie) and _same(cookie, self.auth_value())

    def csrf_token(self, session: str) -> str:
        return hmac.new(self.secret, session.encode(), hashlib.sha256).hexdigest()

    async def csrf_ok(self, request: web.Request) -> bool:
        if self.token is not None and request.headers.get("Authorization", "").startswith(
            "Bearer "
        ):
            return True  # a script's own header; checked by `authenticated`
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            return False
        session = request.cookies.get(SESSION_COOKIE)
        if not session:
            return False
        given = request.headers.get(CSRF_HEADER)
        if given is None and request.content_type == "application/x-www-form-urlencoded":
            given = str((await request.post()).get(CSRF_FIELD, ""))
        # Compared as bytes: compare_digest refuses non-ASCII text (a 500, not a 403).
        return bool(given) and _same(given or "", self.csrf_token(session))

    def host_allowed(self, request: web.Request) -> bool:
        if not self.local_only:
            return True  # the token protects it; the Host may be any name of the machine
        name = (request.url.host or "").lower()
        return is_loopback(name)

    # --- the middleware ---------------------------------------------------------------------
    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self.host_allowed(request):
            return refuse(421, "this dashboard answers to localhost only")
        if request.path not in PUBLIC_PATHS and not self.authenticated(request):
            if request.method == "GET" and not request.path.startswith("/api/"):
                raise web.HTTPSeeOther("/login")
            return refuse(401, "log in first: the dashboard needs its token")
        if request.method in UNSAFE_METHODS and not await self.csrf_ok(request):
            return refuse(403, "refused: missing or wrong CSRF token (reload the page)")
        response = await handler(request)
        self._harden(request, response)
        return response

    def _harden(self, request: web.Request, response: web.StreamResponse) -> None:
        if response.prepared:  # a stream sets its own headers before it starts
            return
        harden(response.headers)
        if SESSION_COOKIE not in request.cookies:
            response.set_cookie(
                SESSION_COOKIE, self.session_of(request), httponly=True, samesite="Strict",
                path="/",
            )

    def session_of(self, request: web.Request) -> str:
        """The browser's session id; a new one (set by the response) on its first visit."""
        session = request.cookies.get(SESSION_COOKIE) or request.get(SESSION_COOKIE)
        if not session:
            session = request[SESSION_COOKIE] = secrets.token_hex(16)
        return str(session)


def harden(headers: Any) -> None:
    """Headers every response carries: no inline script, no framing, no sniffing, no cache."""
    headers.setdefault(
        "Content-Security-Policy",
        "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'; form-action 'self'",
    )
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("X-Frame-Options", "DENY")
    # same-origin, not no-referrer: with no-referrer Chrome sends "Origin: null" on a
    # form POST, and the CSRF check could not tell our own login form from a stranger.
    headers.setdefault("Referrer-Policy", "same-origin")
    headers.setdefault("Cache-Control", "no-store")


def _same(given: str, expected: str) -> bool:
    """Constant-time equality of a value from a request (any bytes) and ours."""
    try:
        return hmac.compare_digest(given.encode(), expected.encode())
    except UnicodeEncodeError:  # undecodable header bytes: never ours
        return False


def refuse(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
