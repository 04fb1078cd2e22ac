"""The HTTP server's front door, as plain ASGI middleware: API key, content type, body size.

Plain ASGI rather than Starlette's `@app.middleware("http")`: that wrapper hands the app a
receive channel on which a client's disconnect never arrives while the app is still
working, so a non-streamed request could not notice its client leaving. Here the body is
read once, up to the limit, whether or not a Content-Length came (chunked uploads count
too), then replayed to the app; after it, receive is the server's own, disconnects included.
"""

from __future__ import annotations

import hmac

from starlette.responses import JSONResponse

OPEN_PATHS = ("/health",)  # answered without the API key (load balancers probe it)
JSON_TYPES = ("application/json", "")  # no Content-Type at all: read as JSON too


def error_response(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None,
                   headers=None) -> JSONResponse:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def content_type_problem(value: str) -> str | None:
    """Why the server will not read a body of this Content-Type, or None: JSON in UTF-8 only."""
    media, *params = [p.strip() for p in value.split(";")]
    if media.lower() not in JSON_TYPES:
        return f"Content-Type {media!r} is not supported: send application/json"
    for p in params:
        name, _, val = p.partition("=")
        if name.strip().lower() == "charset" and val.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return f"charset {val.strip()!r} is not supported: send the JSON body in UTF-8"
    return None


class Guard:
    """ASGI middleware: 401 without the API key (when one is set) on every path but
    OPEN_PATHS; for requests with a body, 415 for a content type other than UTF-8 JSON,
    413 past `max_bytes` (counted while reading), 400 for a body that is not UTF-8."""

    def __init__(self, app, api_key: str | None, max_bytes: int):
        self.app, self.api_key, self.max_bytes = app, api_key, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        problem = self._problem(scope, headers)
        if problem is None and scope["method"] in ("POST", "PUT", "PATCH"):
            body, problem = await self._read(receive, headers)
            if problem is None:
                receive = _replay(body, receive)
        if problem is not None:
            return await problem(scope, receive, send)
        await self.app(scope, receive, send)

    def _problem(self, scope, headers: dict) -> JSONResponse | None:
        if self.api_key and scope["path"] not in OPEN_PATHS:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return error_response(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                      code="invalid_api_key")
        if scope["method"] in ("POST", "PUT", "PATCH"):
            why = content_type_problem(headers.get("content-type", ""))
            if why:
                return error_response(415, why, code="unsupported_media_type")
            size = headers.get("content-length")
            if size is not None and (not size.strip().isdigit() or int(size) > self.max_bytes):
                return self._too_large()
        return None

    def _too_large(self) -> JSONResponse:
        return error_response(413, f"request body larger than {self.max_bytes} bytes", code="request_too_large")

    async def _read(self, receive, headers: dict) -> tuple[bytes, JSONResponse | None]:
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", error_response(400, "the client disconnected while sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:  # stop reading: the rest is never buffered nor parsed
                return b"", self._too_large()
            parts.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(parts)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            return b"", error_response(400, f"the request body is not valid UTF-8 (byte {e.start}): send UTF-8 JSON")
        return body, None


def _replay(body: bytes, receive):
    """A receive channel that gives `body` once, then the server's own messages."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
