"""What the service refuses before any work: bodies over a size (413) and clients over a rate (429)."""

from __future__ import annotations

import json
import time
from collections import OrderedDict


async def refuse(send, status: int, reason: str, headers: tuple = ()) -> None:
    """Answer an ASGI request with `status` and {"detail": reason}."""
    body = json.dumps({"detail": reason}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413, whether its Content-Length says so (refused unread)
    or its chunks add up to it (the app is told the client left, and nothing past the limit is held)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = f"the request body is over the {self.max_bytes} bytes allowed (serve.max_body_bytes)"
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await refuse(send, 413, too_large)
        received, started, refused = 0, False, False

        async def limited_receive():
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # answered here; the app sees a client that left
                    refused = True
                    if not started:
                        await refuse(send, 413, too_large)
                    return {"type": "http.disconnect"}
            return message

        async def tracked_send(message):
            nonlocal started
            if refused:
                return  # the 413 was the answer
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except Exception:  # noqa: BLE001 - the app's error over the disconnect it was told of
            if not refused:
                raise


class RateLimited:
    """ASGI middleware: each client address gets `limit`'s requests to /api/ (before its body is read or
    validated, so a malformed request counts too); beyond, 429 with Retry-After."""

    def __init__(self, app, limit: "RateLimit"):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path", "").startswith("/api/"):
            client = (scope.get("client") or ("unknown", 0))[0]
            wait = self.limit.take(client)
            if wait:
                return await refuse(send, 429, f"over {int(self.limit.capacity)} requests a minute "
                                               "(serve.requests_per_minute): try again later",
                                    headers=((b"retry-after", str(max(1, round(wait))).encode()),))
        return await self.app(scope, receive, send)


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
