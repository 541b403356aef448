"""What a client may send the server: the body's size, how long it may take to arrive, how deep its JSON may nest,
and the connection limits uvicorn is run with. Errors are :class:`BodyError` (an HTTP status and a message).

The default body limit is the largest body a legal request needs (:func:`default_max_body`): ``max_videos``
videos of known frames at the model's size (``frames`` as ``(b, c, k, h, w)`` with ``k`` up to the model's
frame count), their ``known_mask`` and ``cond`` rows, at :data:`NUMBER_BYTES` a number; ``max_videos`` prompts of
``MAX_PROMPT_CHARS`` characters at :data:`PROMPT_CHAR_BYTES` a character; and :data:`JSON_OVERHEAD` for the
scalar fields. It is an upper bound on what ``json.dumps`` of a legal request writes; ``--max-body`` sets
another.
"""

from __future__ import annotations

import json
import re

import numpy as np

# the longest float64 repr json.dumps writes (24 characters: -2.2250738585072014e-308), its ", " separator,
# and 6 bytes for the brackets of rows (one "[], " a row: up to 2 bytes a number for rows of 2 or more)
NUMBER_BYTES = 32
PROMPT_CHAR_BYTES = 12  # a character outside the BMP as json.dumps escapes it: "\ud83d\ude00"
JSON_OVERHEAD = 64 * 1024  # keys, the scalar fields and whitespace
MAX_DEPTH = 6  # the body object, then frames (b, c, k, h, w): the deepest field a request has
CLIENT_TIMEOUT = 30.0  # seconds for a request's head to arrive, and the longest pause in its body (as nginx's)
KEEP_ALIVE = 5  # seconds an idle keep-alive connection stays open (uvicorn's default, set on purpose)
MAX_HEAD_BYTES = 16 * 1024  # request line and headers (h11's buffer for an incomplete event)
CONNECTION_HEADROOM = 32  # connections beyond max_queue + max_batch: health, metrics, job polls


class BodyError(Exception):
    """A request refused before its JSON is checked: ``status`` (400, 408, 413, 415, 422) and a message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def default_max_body(shape: tuple[int, int, int, int], cond_dim: int | None, max_videos: int,
                     max_prompt_chars: int) -> int:
    """The largest body a legal request needs, in bytes (see the module's docstring).

    Args:
        shape: ``(c, f, h, w)`` of one video (``Pipeline.shape``).
        cond_dim: the embedding size (None: an unconditional model).
        max_videos: videos one request may ask for.
        max_prompt_chars: characters a prompt may have.
    """
    c, f, h, w = shape
    numbers = max_videos * (c * f * h * w + f + (cond_dim or 0))  # frames, known_mask, cond
    prompts = max_videos * max_prompt_chars * PROMPT_CHAR_BYTES if cond_dim else 0
    return numbers * NUMBER_BYTES + prompts + JSON_OVERHEAD


def too_large(limit: int, size: int | None = None) -> str:
    said = f" (Content-Length {size})" if size is not None else ""
    return (f"the body is larger than the server's limit of {limit} bytes{said}: the largest legal request fits "
            "(the server's --max-body sets another)")


def check_content_type(value: str | None) -> None:
    """Only ``application/json`` (UTF-8): a browser's cross-site form or ``text/plain`` post cannot send it
    without a CORS preflight, which this server never grants."""
    media, _, params = (value or "").partition(";")
    charset = re.search(r"charset\s*=\s*\"?([^\";\s]+)", params, re.I)
    if media.strip().lower() != "application/json" or (charset and charset.group(1).lower() not in ("utf-8", "utf8")):
        got = f"Content-Type {value!r}" if value else "no Content-Type"
        raise BodyError(415, f"the body must be JSON sent as Content-Type: application/json (UTF-8); got {got}")


async def read_body(receive, headers, limit: int, idle_timeout: float = CLIENT_TIMEOUT) -> bytearray:
    """The request's body from the ASGI ``receive``, at most ``limit`` bytes.

    Refused from ``Content-Length`` before a byte is read, and while streaming (chunked uploads): 413 as soon
    as the bytes pass the limit. A pause of ``idle_timeout`` seconds between two reads is a 408.

    Raises:
        BodyError: 413 or 408.
        ClientGone: the client disconnected mid-upload (what was read is dropped with the call).
    """
    import asyncio

    length = headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:  # h11 refuses a malformed one first
        raise BodyError(413, too_large(limit, int(length)))
    body = bytearray()
    while True:
        try:
            message = await asyncio.wait_for(receive(), idle_timeout)
        except asyncio.TimeoutError:
            raise BodyError(408, f"the body stopped arriving: no bytes for {idle_timeout:g} s "
                                 f"({len(body)} bytes read)") from None
        if message["type"] == "http.disconnect":
            raise ClientGone()
        body += message.get("body", b"")
        if len(body) > limit:
            raise BodyError(413, too_large(limit))
        if not message.get("more_body", False):
            return body


class ClientGone(Exception):
    """The client disconnected before its body arrived."""


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_CHUNK = 1 << 20


def nesting(body: bytes | bytearray, limit: int = MAX_DEPTH) -> int:
    """How deep the JSON in ``body`` nests its arrays and objects, counted up to the first level past ``limit``.

    A bracket scan, not a parse (numpy over the bytes outside strings, 1 MiB at a time): it never recurses, so a
    body of 100,000 ``[`` costs a scan, not a RecursionError. Exact on UTF-8 (no multi-byte character holds
    an ASCII byte); brackets inside strings are not counted.
    """
    if b'"' in body:
        body = _STRING.sub(b'""', body)
    view = np.frombuffer(body, np.uint8)
    depth = deepest = 0
    for start in range(0, len(view), _CHUNK):
        chunk = view[start:start + _CHUNK]
        step = ((chunk == 0x5B) | (chunk == 0x7B)).astype(np.int32) - ((chunk == 0x5D) | (chunk == 0x7D))
        if not step.any():
            continue
        levels = np.cumsum(step) + depth
        deepest = max(deepest, int(levels.max()))
        if deepest > limit:
            return deepest
        depth = int(levels[-1])
    return deepest


def load_json(body: bytes | bytearray, max_depth: int = MAX_DEPTH):
    """The body as JSON: UTF-8, nesting at most ``max_depth`` levels, numbers Python can read.

    Raises:
        BodyError: 422 naming what is wrong (never a RecursionError or a traceback).
    """
    depth = nesting(body, max_depth)
    if depth > max_depth:
        raise BodyError(422, f"the body nests {depth} levels deep (or more); a request nests at most {max_depth} "
                             "(the body object, then frames (b, c, k, h, w))")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BodyError(422, f"the body is not UTF-8 text: {e}") from None
    try:
        return json.loads(text, parse_int=_read_int, parse_float=_read_float)
    except json.JSONDecodeError as e:
        raise BodyError(422, f"the body is not valid JSON: {e}") from None
    except RecursionError:  # unreachable after the scan; kept so no body can ever cause a 500
        raise BodyError(422, f"the body nests too deep (at most {max_depth} levels)") from None


def _read_float(text: str) -> float:
    """``float``, as a Python function on purpose: json's C scanner holds the GIL for a whole parse (1.7 s for a
    52 MB body here), so a parse on a worker thread would still stall the event loop; a Python call per number
    lets the interpreter hand the GIL to the loop every switch interval (5 ms)."""
    return float(text)


def _read_int(text: str) -> int:
    """A JSON integer, refused past float64's range (about 1.8e308): no field takes one, and the checks
    would meet it as an OverflowError; its digits are counted before ``int()`` (which stops at 4300)."""
    if len(text) <= 310:
        value = int(text)
        try:
            float(value)
            return value
        except OverflowError:
            pass
    raise BodyError(422, f"the body holds an integer of {len(text.lstrip('-'))} digits: numbers must fit a float64 "
                         "(up to about 1.8e308)")


def uvicorn_limits(max_queue: int, max_batch: int, client_timeout: float = CLIENT_TIMEOUT) -> dict:
    """uvicorn's ``Config`` keywords for the server's connection limits, each set on purpose:

    - ``http``: uvicorn's h11 protocol with a deadline for a request's head (:func:`head_timeout_protocol`: a
      connection that has not sent its request line and headers within ``client_timeout`` seconds is closed);
    - ``h11_max_incomplete_event_size``: :data:`MAX_HEAD_BYTES` for the request line and headers (past it: 400);
    - ``timeout_keep_alive``: :data:`KEEP_ALIVE` seconds an idle connection stays open;
    - ``limit_concurrency``: ``max_queue + max_batch`` requests can wait or run, plus
      :data:`CONNECTION_HEADROOM` for health checks, metrics and job polls; past it uvicorn answers 503 itself
      (before the app: no ``X-Request-Id``).
    """
    return {"http": head_timeout_protocol(client_timeout), "h11_max_incomplete_event_size": MAX_HEAD_BYTES,
            "timeout_keep_alive": KEEP_ALIVE, "limit_concurrency": max_queue + max_batch + CONNECTION_HEADROOM}


def head_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol closing a connection whose request head has not arrived ``seconds`` after it opened
    or after its previous response (slow-header clients, "slowloris"); uvicorn itself has no such deadline."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadTimeoutProtocol(H11Protocol):
        _head_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_timer()

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(seconds, self._head_timed_out)

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()  # no complete request head in time (an idle keep-alive one ends earlier)

    return HeadTimeoutProtocol
