"""Who may call the API and how much they may send: API keys, the request body limit, CORS.

One ASGI middleware sits in front of the gateway's routes. It answers CORS (only when origins are
configured), then asks for a Bearer key on every path but the open ones (probes, the page shell
and its assets, the API description), then reads a request body ahead up to the limit, so an
oversized body is refused the same way whether it declared its length or came chunked.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.errors import field_error

# Anyone may fetch these: load balancers probe them, and the page must load to ask for a key.
OPEN_PATHS = frozenset({"/", "/healthz", "/readyz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
OPEN_PREFIXES = ("/static/",)
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def load_api_keys(env_name: str) -> tuple[str, ...]:
    """The comma-separated keys in `$env_name`; none at all is an error, never a service run open."""
    keys = tuple(key.strip() for key in os.environ.get(env_name, "").split(",") if key.strip())
    if not keys:
        raise ValueError(
            f"auth.api_keys_env names ${env_name}, but it is empty or not set where the app is built; "
            f"export {env_name}=<key>[,<key>...] before `serve run`, or remove `auth` to serve without keys"
        )
    return keys


@dataclass(frozen=True)
class SecurityPolicy:
    """One gateway replica's rules; the keys stay out of its repr, so logging the settings leaks nothing."""

    api_keys: tuple[str, ...] = field(default=(), repr=False)
    max_body_bytes: int = 64 * 1024
    cors_origins: tuple[str, ...] = ()

    def authorized(self, authorization: bytes | None) -> bool:
        if not self.api_keys:
            return True
        scheme, _, token = (authorization or b"").partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        # Every key is compared, in constant time each: the time taken tells nothing about a near miss.
        return any([hmac.compare_digest(token.strip(), key.encode()) for key in self.api_keys])


class RequestGuard:
    """ASGI middleware applying the replica's SecurityPolicy, which `policy()` returns at request time.

    Serve freezes the FastAPI app (middleware included) when the gateway module is imported, before
    any replica has its settings, hence the late look-up; the chain is built on the first request.
    """

    def __init__(self, app: ASGIApp, policy: Callable[[], SecurityPolicy]):
        self.app, self.policy, self.chain = app, policy, None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan runs before the replica knows its policy
            await self.app(scope, receive, send)
            return
        if self.chain is None:
            self.chain = guarded(self.app, self.policy())
        await self.chain(scope, receive, send)


def guarded(app: ASGIApp, policy: SecurityPolicy) -> ASGIApp:
    """CORS outermost, so preflights (which carry no key) and refusals alike get its headers."""
    checked = _KeyAndBodyChecks(app, policy)
    if not policy.cors_origins:
        return checked
    return CORSMiddleware(
        checked,
        allow_origins=list(policy.cors_origins),
        allow_methods=["GET", "POST", "DELETE"],
        allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
        expose_headers=["Retry-After", "X-Video-Job", "Content-Range"],
    )


class _KeyAndBodyChecks:
    """HTTP only: RequestGuard passes every other scope straight to the app."""

    def __init__(self, app: ASGIApp, policy: SecurityPolicy):
        self.app, self.policy = app, policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        if not is_open(scope) and not self.policy.authorized(headers.get(b"authorization")):
            error = field_error(401, "unauthorized", "Authorization", "missing or wrong API key; send Authorization: Bearer <key>",
                                headers={"WWW-Authenticate": "Bearer"})
            await error.response()(scope, receive, send)
            return
        limit = self.policy.max_body_bytes
        declared = headers.get(b"content-length", b"")
        too_large = declared.isdigit() and int(declared) > limit
        if not too_large and scope["method"] in BODY_METHODS:  # a chunked body declares no length
            messages = await read_ahead(receive, limit)
            too_large = messages is None
            if not too_large:
                receive = replaying(messages, receive)
        if too_large:
            error = field_error(413, "body_too_large", "body", f"larger than this server's limit of {limit} bytes (gateway.max_body_bytes)")
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


def is_open(scope: Scope) -> bool:
    """Whether the path, below the app's route prefix, is one anyone may fetch."""
    path, prefix = scope["path"], scope.get("root_path", "")
    if prefix and path.startswith(prefix):
        path = path[len(prefix):] or "/"
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


async def read_ahead(receive: Receive, limit: int) -> list[Message] | None:
    """The request's body messages, read up to `limit` bytes; None as soon as it goes past."""
    messages, size = [], 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages
        size += len(message.get("body", b""))
        if size > limit:
            return None
        if not message.get("more_body", False):
            return messages


def replaying(messages: list[Message], receive: Receive) -> Receive:
    """A receive that gives back what was read ahead, then listens on (for the client going away)."""
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed
