"""What the service refuses before any work: bodies over a size (413) and clients over a rate (429)."""

from __future__ import annotations

import json
import time
from collections import OrderedDict


class TooLarge(Exception):
    pass


async def refuse(send, status: int, reason: str, headers: tuple = ()) -> None:
    """Answer an ASGI request with `status` and {"detail": reason}."""
    body = json.dumps({"detail": reason}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413, whether its Content-Length says so or its chunks
    add up to it (nothing past the limit is held)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = f"the request body is over the {self.max_bytes} bytes allowed (serve.max_body_bytes)"
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await refuse(send, 413, too_large)
        received, started = 0, False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise TooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except TooLarge:
            if not started:
                await refuse(send, 413, too_large)


class RateLimit:
    """A token bucket per client address: `per_minute` requests a minute, in bursts of as many; the oldest of over
    `clients` addresses are forgotten."""

    def __init__(self, per_minute: int, clients: int = 10_000, clock=time.monotonic):
        self.capacity, self.rate, self.clients, self.clock = float(per_minute), per_minute / 60.0, clients, clock
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # address -> (tokens, when)

    def take(self, client: str) -> float:
        """0 if `client` may make a request now (one token taken), else the seconds until it may."""
        now = self.clock()
        tokens, when = self.buckets.pop(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - when) * self.rate)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
        self.buckets[client] = (tokens - 1 if not wait else tokens, now)
        while len(self.buckets) > self.clients:
            self.buckets.popitem(last=False)
        return wait
