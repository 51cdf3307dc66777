"""One image request, as img2dataset's `download_image` makes it, under the download policy
(`pipeline/formats/policy.py`) and with the limits the web needs:

- only http(s); the host is resolved once, each address checked (link-local and metadata: always
  refused; private and loopback: unless `download.allow_private_network`) and the connection made to the
  checked address (no second lookup a rebinding DNS could answer otherwise), with the Host header and
  TLS SNI still the hostname; redirects are followed here, each hop checked the same way;
- a whole-request deadline: urllib's `timeout` bounds each socket read, so a server that sends one
  byte a second never times out; here every read of the connection (TLS handshake, status line, headers,
  chunk framing, body) gets what is left of one deadline;
- `max_bytes`: a Content-Length over it is refused before the body, and the body is cut at it; all the bytes
  received on the connection (head and framing too: an endless `100 Continue`) are capped at max_bytes + 64 KiB;
- the image size is parsed as soon as the header has arrived: an image over `max_image_area`, or whose
  size is not in its first MiB, fails before OpenCV decodes it;
- X-Robots-Tag opt-outs (img2dataset's rule) are honoured before the body is read.

Every failure is a reason from the policy's vocabulary. `pipeline/stages/download/hook.py` makes img2dataset's
downloader use it (img2dataset looks `download_image` up in its module at call time, and has no hook for any of this).
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Optional
from urllib.parse import quote, urljoin, urlsplit

from pipeline.formats import policy as P
from pipeline.formats.image_header import image_area

CHUNK = 1 << 16
HEADER_PROBE_LIMIT = 1 << 20  # an image whose size is not in its first MiB is refused
REDIRECT_CODES = (301, 302, 303, 307, 308)
HEAD_ALLOWANCE = 64 << 10  # bytes a response may spend on its status line, headers and chunk framing


def _default(name: str):
    """DownloadConfig's default of a field: the one place the policy's defaults are written."""
    from pipeline.run.config import DownloadConfig

    return DownloadConfig.model_fields[name].get_default(call_default_factory=True)


@dataclass(frozen=True)
class FetchPolicy:
    """The limits of one request (from DownloadConfig, whose defaults these are)."""

    timeout: float = _default("timeout")
    max_image_area: float = _default("max_image_area")
    max_bytes: int = _default("max_bytes")
    allow_private_network: bool = _default("allow_private_network")
    redirects: int = _default("redirects")
    user_agent_token: Optional[str] = None
    disallowed_header_directives: tuple[str, ...] = tuple(P.DEFAULT_DISALLOWED_DIRECTIVES)

    @classmethod
    def of(cls, config) -> "FetchPolicy":
        """The policy of a DownloadConfig."""
        return cls(timeout=config.timeout, max_image_area=config.max_image_area, max_bytes=config.max_bytes,
                   allow_private_network=config.allow_private_network, redirects=config.redirects,
                   user_agent_token=config.user_agent_token,
                   disallowed_header_directives=tuple(config.disallowed_header_directives))


class Refused(Exception):
    """A request ended with a reason of the policy's vocabulary."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class RequestTimeout(TimeoutError):
    """The whole request took longer than its deadline."""


_resolve = socket.getaddrinfo
_connect = socket.create_connection


def _lookup(host: str, port: int, deadline: float, timeout: float) -> list:
    """getaddrinfo within the request's deadline: the resolver has no timeout of its own (a slow DNS server
    holds it for its retries, 10 s and more), so it runs in a thread the request stops waiting for."""
    try:  # an address literal needs no DNS (nor a thread)
        ipaddress.ip_address(host.split("%", 1)[0])
        return _resolve(host, port, type=socket.SOCK_STREAM)
    except ValueError:
        pass
    answer: dict = {}
    done = threading.Event()

    def run() -> None:
        try:
            answer["infos"] = _resolve(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            answer["refused"] = True
        except Exception as error:  # noqa: BLE001 - handed to the request's thread
            answer["error"] = error
        finally:
            done.set()

    threading.Thread(target=run, daemon=True, name="dns").start()
    if not done.wait(_remaining(deadline, timeout)):
        raise RequestTimeout(f"timed out: no address within {timeout:g} s")
    if "refused" in answer:
        raise Refused(P.REFUSED_NO_ADDRESS)
    if "error" in answer:
        raise answer["error"]
    return answer["infos"]


def checked_addresses(host: str, port: int, policy: FetchPolicy, deadline: Optional[float] = None) -> list[str]:
    """The addresses of `host` the policy allows, in the resolver's order; raises Refused if there are none."""
    infos = _lookup(host, port, time.monotonic() + policy.timeout if deadline is None else deadline, policy.timeout)
    allowed, refusals = [], []
    for address in dict.fromkeys(str(info[4][0]) for info in infos):
        refusal = P.address_refusal(address, policy.allow_private_network)
        (refusals if refusal else allowed).append(refusal or address)
    if not allowed:
        # the always-refused reason first: the flag would not help there
        raise Refused(P.REFUSED_METADATA if P.REFUSED_METADATA in refusals else (refusals or [P.REFUSED_NO_ADDRESS])[0])
    return allowed


class _Guard:
    """One request's deadline and byte budget, shared by every read of its connections."""

    def __init__(self, deadline: float, timeout: float, budget: int):
        self.deadline, self.timeout, self.budget, self.received = deadline, timeout, budget, 0

    def left(self) -> float:
        return _remaining(self.deadline, self.timeout)


class _GuardedRaw(io.RawIOBase):
    """The socket reads of a response: each waits at most what is left of the deadline, and all of them together
    (status line, headers, chunk-size lines, trailers, body) stop at the request's byte budget. http.client's own
    timeout covers one recv at a time, and the head and framing take many: a header byte every 0.3 s held a
    1 s request for 14 s, and an endless `100 Continue` was read for ever."""

    def __init__(self, buffered, sock, guard: _Guard):
        super().__init__()
        self.buffered, self.sock, self.guard = buffered, sock, guard  # buffered: makefile's, kept for its close

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self.sock.settimeout(self.guard.left())
        count = self.buffered.raw.readinto(buffer) or 0
        self.guard.received += count
        if self.guard.received > self.guard.budget:
            raise Refused(P.TOO_LARGE_BYTES)
        return count

    def close(self) -> None:
        if not self.closed:
            self.buffered.close()
        super().close()


class _GuardedResponse(http.client.HTTPResponse):
    """A response whose every read goes through the request's guard."""

    def __init__(self, sock, guard: _Guard, **kwargs):
        super().__init__(sock, **kwargs)
        self.fp = io.BufferedReader(_GuardedRaw(self.fp, sock, guard), CHUNK)


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to one checked address; the Host header still names the host."""

    def __init__(self, host: str, port: int, address: str, guard: _Guard):
        super().__init__(host, port, timeout=guard.left())
        self.address, self.guard = address, guard
        self.response_class = lambda sock, **kwargs: _GuardedResponse(sock, guard, **kwargs)

    def connect(self) -> None:
        self.sock = self.pinned = _connect((self.address, self.port), self.guard.left())
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(self.guard.left())  # the request's send


_CONTEXTS: dict = {}


def _tls_context() -> ssl.SSLContext:
    """The default TLS context, made once per process (116 ms each on a loaded machine), again only if the
    certificate store it reads (SSL_CERT_FILE / SSL_CERT_DIR) is changed."""
    key = (os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    if key not in _CONTEXTS:
        _CONTEXTS[key] = ssl.create_default_context()
    return _CONTEXTS[key]


class _PinnedHTTPS(_PinnedHTTP, http.client.HTTPSConnection):
    """An HTTPS connection to one checked address; SNI and the certificate check still use the host name."""

    def __init__(self, host: str, port: int, address: str, guard: _Guard):
        http.client.HTTPSConnection.__init__(self, host, port, timeout=guard.left(), context=_tls_context())
        self.address, self.guard = address, guard
        self.response_class = lambda sock, **kwargs: _GuardedResponse(sock, guard, **kwargs)

    def connect(self) -> None:
        sock = _connect((self.address, self.port), self.guard.left())
        sock.settimeout(self.guard.left())  # the whole handshake: the ssl module bounds it as one call
        self.sock = self.pinned = self._context.wrap_socket(sock, server_hostname=self.host)
        self.sock.settimeout(self.guard.left())


def _remaining(deadline: float, timeout: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise RequestTimeout(f"timed out: no whole body within {timeout:g} s")
    return left


def _open(url: str, policy: FetchPolicy, deadline: float, guard: Optional[_Guard] = None):
    """(connection, response) for one hop of `url`, checked before any connection is made."""
    refusal = P.scheme_refusal(url)
    if refusal:
        raise Refused(refusal)
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:  # a port that is not a number, brackets that do not close
        raise Refused(P.REFUSED_BAD_URL) from None
    if not parts.hostname:
        raise Refused(P.REFUSED_BAD_URL)
    target = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~") + (
        "?" + quote(parts.query, safe="/%:@!$&'()*+,;=-._~?") if parts.query else "")
    kind = _PinnedHTTPS if parts.scheme.lower() == "https" else _PinnedHTTP
    headers = {"User-Agent": P.user_agent(policy.user_agent_token), "Accept": "image/*,*/*;q=0.8"}
    error: Optional[BaseException] = None
    guard = guard or _Guard(deadline, policy.timeout, policy.max_bytes + HEAD_ALLOWANCE)
    for address in checked_addresses(parts.hostname, port, policy, deadline):
        connection = kind(parts.hostname, port, address, guard)
        try:
            connection.request("GET", target, headers=headers)
            return connection, connection.getresponse()
        except OSError as e:  # refused or unreachable: the next checked address, as create_connection does
            connection.close()
            error = e
        except BaseException:  # a refusal (too many bytes in the head): the socket is closed, not left to the GC
            connection.close()
            raise
    raise error  # type: ignore[misc]


def fetch(url: str, policy: FetchPolicy) -> bytes:
    """The body of `url` under `policy`, within its timeout in all; raises Refused (a reason) or an error."""
    deadline = time.monotonic() + policy.timeout
    guard = _Guard(deadline, policy.timeout, policy.max_bytes + HEAD_ALLOWANCE)  # the budget spans the hops
    for _ in range(policy.redirects + 1):
        connection, response = _open(url, policy, deadline, guard)
        try:
            if response.status in REDIRECT_CODES:
                location = response.getheader("Location")
                if not location:
                    raise Refused(P.REDIRECT_WITHOUT_LOCATION)
                url = urljoin(url, location.strip())
                continue
            if not 200 <= response.status < 300:
                raise Refused(P.http_status(response.status))
            directive = P.opt_out(response.headers.get_all("X-Robots-Tag") or [], policy.user_agent_token,
                                  policy.disallowed_header_directives)
            if directive:
                raise Refused(P.opted_out(directive))
            return _read_body(connection, response, policy, deadline)
        finally:
            connection.close()
    raise Refused(P.TOO_MANY_REDIRECTS)


def _read_body(connection, response, policy: FetchPolicy, deadline: float) -> bytes:
    """The body, read against the deadline and cut at max_bytes, its image size checked from its header."""
    if response.length is not None and response.length > policy.max_bytes:
        raise Refused(P.TOO_LARGE_BYTES)  # the Content-Length says so: not one byte of the body is read
    body, area = bytearray(), None
    while True:
        # each read waits at most what is left of the deadline (the response's _GuardedRaw: http.client hands the
        # socket to the response, connection.sock = None, when the server will close, and the reads still go to it)
        try:
            chunk = response.read1(CHUNK)
        except http.client.IncompleteRead:
            raise Refused(P.TRUNCATED) from None
        _remaining(deadline, policy.timeout)
        if not chunk:
            break
        if len(body) + len(chunk) > policy.max_bytes:
            raise Refused(P.TOO_LARGE_BYTES)
        body += chunk
        if area is None and len(body) - len(chunk) < HEADER_PROBE_LIMIT:
            area = image_area(bytes(body[:HEADER_PROBE_LIMIT]))
            if area is not None and area > policy.max_image_area:
                raise Refused(P.TOO_LARGE_AREA)
    if response.length:  # the server closed before its Content-Length
        raise Refused(P.TRUNCATED)
    if area is None:  # OpenCV would decode it whole to learn its size
        raise Refused(P.SIZE_UNREADABLE)
    return bytes(body)


def reason_of(error: BaseException) -> str:
    """The vocabulary's reason for an error a fetch raised."""
    if isinstance(error, Refused):
        return error.reason
    if isinstance(error, TimeoutError):  # socket.timeout and RequestTimeout
        return P.TIMED_OUT
    if isinstance(error, http.client.IncompleteRead):
        return P.TRUNCATED
    return P.error_class(error)
