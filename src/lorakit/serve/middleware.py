"""The HTTP edge of `lorakit serve`: ASGI middlewares that run before any route.

    app.add_middleware(BodyLimit, max_bytes=1_000_000, timeout=30.0)   # 413, 408
    app.add_middleware(ApiKeyGuard, api_key="secret")                  # 401 (added last: runs first)

Owns the checks made on the raw request: the API key (`--api-key`, compared in constant
time) and the body (its size, `--max-request-bytes`, and how long it may take to arrive,
`--body-timeout`, so a body shorter than its Content-Length cannot hold a connection). Every
refusal leaves in OpenAI's error shape (`error_response`).
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

from starlette.responses import JSONResponse

from .protocol import ApiError

OPEN_PATHS = frozenset({"/health"})  # answered without the API key


def error_response(err: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    """`err` as a JSON response: OpenAI's body, its status, its headers (and `headers`)."""
    return JSONResponse(err.body(), status_code=err.status, headers={**err.headers, **(headers or {})})


class ApiKeyGuard:
    """ASGI middleware: every HTTP request but `open_paths` needs `Authorization: Bearer <api_key>`.

    Runs before the body is read, so an unauthenticated client costs no body parsing.

    Args:
        app: The wrapped ASGI app.
        api_key: The key; compared with `hmac.compare_digest`.
        open_paths: Paths answered without the key. Default: /health.

    Raises:
        ValueError: an empty key.
    """

    def __init__(self, app: Any, api_key: str, open_paths: frozenset[str] = OPEN_PATHS) -> None:
        if not api_key:
            raise ValueError("the API key must not be empty")
        self.app = app
        self._key = api_key.encode()
        self.open_paths = open_paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        given = _bearer_token(scope)
        if given is not None and hmac.compare_digest(given, self._key):
            return await self.app(scope, receive, send)
        message = ("missing API key: send the header 'Authorization: Bearer <key>'" if given is None
                   else "invalid API key")
        error = ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await error_response(error)(scope, receive, send)


def _bearer_token(scope: dict) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header, or None without one."""
    header = dict(scope.get("headers") or []).get(b"authorization")
    if header is None:
        return None
    scheme, _, token = header.strip().partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else None


class BodyTooLarge(Exception):
    """The body grew past the limit while it was read."""


class BodyLimit:
    """ASGI middleware: a body above `max_bytes` is answered 413, one slower than `timeout` 408.

    The declared Content-Length is checked first; the body is then read (at most max_bytes + 1
    bytes, whatever it declares) within `timeout` seconds in all, and replayed to the app. A
    408 closes the connection (`Connection: close`): the rest of that body may still arrive.

    Args:
        app: The wrapped ASGI app.
        max_bytes: Largest body accepted.
        timeout: Seconds the whole body may take to arrive; None for no limit.
    """

    def __init__(self, app: Any, max_bytes: int, timeout: float | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(self._too_large(), scope, receive, send)
        try:
            async with asyncio.timeout(self.timeout):
                body = await self._read(receive)
        except BodyTooLarge:
            return await self._refuse(self._too_large(), scope, receive, send)
        except TimeoutError:
            error = ApiError(408, f"the request body did not arrive within {self.timeout:g} s (--body-timeout)",
                             code="request_body_timeout")
            return await self._refuse(error, scope, receive, send, {"Connection": "close"})
        if body is None:  # the client left while sending
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive: Any) -> bytes | None:
        """The whole body, or None if the client disconnected first.

        Raises:
            BodyTooLarge: more than max_bytes arrived.
        """
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                raise BodyTooLarge
        return bytes(body)

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body is larger than this server's limit of {self.max_bytes} bytes "
                             "(--max-request-bytes)", code="request_too_large")

    @staticmethod
    async def _refuse(error: ApiError, scope: dict, receive: Any, send: Any,
                      headers: dict[str, str] | None = None) -> None:
        await error_response(error, headers)(scope, receive, send)
