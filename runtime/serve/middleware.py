"""The app's front door, a plain ASGI middleware (inside Starlette's error middleware, around the routes):

- every response carries ``X-Request-Id`` (the client's own when it is a short token, else a new one), and
  :func:`request_id` gives it to whatever logs while handling the request (threads started with
  ``asyncio.to_thread`` included);
- with an :class:`~.auth.ApiKey` set, a request without the key is answered 401 before any route runs;
- an exception no handler caught is a server fault: logged once with its request id and traceback, answered
  500 with a JSON body naming the request id (never the traceback).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import uuid

from .auth import ApiKey

log = logging.getLogger("vdeploy.runtime.serve")
_REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("vdeploy_request_id", default="-")
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id() -> str:
    """The id of the request being handled ("-" outside one)."""
    return _REQUEST_ID.get()


async def send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


class FrontDoor:
    """Request ids, the API key and server faults around ``app`` (see the module's docstring)."""

    def __init__(self, app, api_key: ApiKey | None = None):
        self.app = app
        self.api_key = api_key or ApiKey(None)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        given = headers.get("x-request-id", "")
        rid = given if _CLIENT_ID.fullmatch(given) else uuid.uuid4().hex
        token = _REQUEST_ID.set(rid)
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            why = self.api_key.refusal(scope["path"], headers.get("authorization"))
            if why is not None:
                close = [(b"connection", b"close")] if _has_body(headers) else []  # not read: do not drain it
                await send_json(send_with_id, 401, {"error": why, "field": None},
                                [(b"www-authenticate", b'Bearer realm="vdeploy"'), *close])
                return
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s (%s %s) failed on the server", rid, scope.get("method"), scope.get("path"))
            if not started:  # else the response is cut short and the connection closed by uvicorn
                await send_json(send_with_id, 500, {"error": f"internal server error (request id {rid}: the "
                                                             "server's log has the details)", "field": None,
                                                    "request_id": rid})
        finally:
            _REQUEST_ID.reset(token)


def _has_body(headers: dict) -> bool:
    return headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in headers
