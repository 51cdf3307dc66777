"""What the download stage may fetch, how it names itself, and the words a failed row is counted under.

Every byte of a URL list and of a response is hostile: a URL may name `file:///dev/zero`, the cloud's
metadata service or the Ray dashboard, and a server may write anything into its status line. So:
- only `http` and `https` are fetched;
- the host is resolved once, each address is checked, and the connection goes to the checked address
  (`pipeline/formats/fetch.py`), again on every redirect hop: link-local and cloud metadata addresses are always
  refused, private, loopback and other non-global addresses unless `download.allow_private_network`;
- a failed row's reason comes from the fixed vocabulary below, never from the server's free text, so
  `failed_by_reason` stays a small set whatever the web sends;
- credentials in a URL (`user:pass@`, signed query strings) are redacted by `pipeline.run.redact.redact_url` wherever a URL
  is logged or stored.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import Iterable, Optional
from urllib.parse import urlsplit

from pipeline.run.config import DEFAULT_DISALLOWED_DIRECTIVES  # noqa: F401 - img2dataset's X-Robots-Tag opt-outs

PROJECT = "dalle2-ray"
PROJECT_README = "https://github.com/dalle2-ray/dalle2-ray#readme"  # where a site owner reads who we are
ALLOWED_SCHEMES = ("http", "https")

# Cloud instance metadata and other host-local services that are not link-local but must never be reached.
METADATA_ADDRESSES = {
    ipaddress.ip_address("fd00:ec2::254"),  # AWS IMDS over IPv6
    ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud metadata
    ipaddress.ip_address("168.63.129.16"),  # Azure wire server
    ipaddress.ip_address("192.0.0.192"),  # Oracle Cloud metadata (legacy)
}
LINK_LOCAL = [ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10")]
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # an IPv4 address embedded in IPv6 reaches that IPv4 host
# RFC 8215's local-use NAT64 prefix: the operator picks the prefix length (RFC 6052: /48, /56, /64 or /96 within
# it), so every place an IPv4 address can sit is judged
LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # the deprecated ::a.b.c.d, which some stacks still route as IPv4

# ---- the vocabulary of failure reasons: every reason a fetch can end with is made here ----
REFUSED_PRIVATE = "refused: private address (set download.allow_private_network)"
REFUSED_METADATA = "refused: link-local or metadata address"
REFUSED_BAD_URL = "refused: malformed url"
REFUSED_NO_ADDRESS = "dns: no address"
TOO_LARGE_BYTES = "too large: max_bytes"
TOO_LARGE_AREA = "too large: max_image_area"
SIZE_UNREADABLE = "refused: image size not in its header"
TOO_MANY_REDIRECTS = "too many redirects"
REDIRECT_WITHOUT_LOCATION = "redirect without location"
TIMED_OUT = "timed out"
TRUNCATED = "truncated body"
DECODE_ERROR = "decode error"
# img2dataset's resizer's own fixed messages (anything else it says becomes DECODE_ERROR)
# the schemes a refusal names; any other is `other`, so a server's Location cannot mint a new reason per redirect
REFUSED_SCHEMES = ("file", "ftp", "ftps", "sftp", "data", "javascript", "gopher", "mailto", "ws", "wss", "jar",
                   "blob", "about", "ldap", "dict", "smb", "tftp", "telnet", "s3", "gs", "none")
RESIZER_MESSAGES = {"image too small", "image area too large", "aspect ratio too large", "Image decoding error",
                    "blurrer not defined", "hash mismatch"}


def refused_scheme(scheme: str) -> str:
    """The reason for a URL of another scheme than http(s); an odd scheme is not echoed."""
    scheme = scheme.lower()
    return f"refused: scheme {scheme if scheme in REFUSED_SCHEMES else 'other'}"


def http_status(code: int) -> str:
    """The reason for an HTTP status: the code alone, never the server's text."""
    return f"http {code}" if 100 <= code <= 599 else "http invalid status"


def opted_out(directive: str) -> str:
    """The reason for an image its server opted out of with an X-Robots-Tag directive (one we were told to honour)."""
    return f"opted out: {directive}"


def error_class(error: BaseException) -> str:
    """The reason for an exception: its class name, never its message (which may quote the server)."""
    return f"error: {type(error).__name__}"


def resize_reason(message: Optional[str]) -> str:
    """img2dataset's resizer message as a reason: its own fixed texts, or one word for the rest (OpenCV's)."""
    if message in RESIZER_MESSAGES:
        return message
    if message and "CV_IO_MAX_IMAGE_PIXELS" in message:  # OpenCV's pixel limit, set from max_image_area
        return TOO_LARGE_AREA
    return DECODE_ERROR


FIXED_REASONS = {REFUSED_PRIVATE, REFUSED_METADATA, REFUSED_BAD_URL, REFUSED_NO_ADDRESS, TOO_LARGE_BYTES,
                 TOO_LARGE_AREA, SIZE_UNREADABLE, TOO_MANY_REDIRECTS, REDIRECT_WITHOUT_LOCATION, TIMED_OUT, TRUNCATED,
                 DECODE_ERROR, "http invalid status"} | RESIZER_MESSAGES
REASON_FORMS = re.compile(r"http [1-5]\d\d|error: [A-Za-z_]\w{0,63}|opted out: [a-z0-9_.-]{1,32}|"
                          r"refused: scheme (%s|other)" % "|".join(map(re.escape, REFUSED_SCHEMES)))


def stable_reason(message: Optional[str]) -> str:
    """`message` if it is one of the vocabulary's reasons, else "other" (a bounded set whatever a row said)."""
    if message in FIXED_REASONS or (message and REASON_FORMS.fullmatch(message)):
        return message
    return "other" if message else "unknown"


# ---- addresses ----
def address_refusal(address: str, allow_private: bool) -> Optional[str]:
    """Why a resolved address may not be connected to (a reason), or None if it may."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return REFUSED_BAD_URL
    if isinstance(ip, ipaddress.IPv6Address):  # an IPv4 address in IPv6 clothing is judged as that IPv4
        embedded = ip.ipv4_mapped or ip.sixtofour or (
            ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in NAT64 or ip in IPV4_COMPATIBLE else None)
        if embedded is not None:
            return address_refusal(str(embedded), allow_private)
        if ip in LOCAL_NAT64:
            b = ip.packed  # RFC 6052's places for the prefix lengths /48, /56, /64, /96 (byte 8 is always skipped)
            places = [b[6:8] + b[9:11], b[7:8] + b[9:12], b[9:13], b[12:16]]
            refusals = {address_refusal(str(ipaddress.IPv4Address(p)), allow_private) for p in places}
            if REFUSED_METADATA in refusals:
                return REFUSED_METADATA
    if ip in METADATA_ADDRESSES or any(ip in net for net in LINK_LOCAL if net.version == ip.version):
        return REFUSED_METADATA
    if not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_unspecified or ip.is_loopback:
        return None if allow_private else REFUSED_PRIVATE
    return None


def scheme_refusal(url: str) -> Optional[str]:
    """Why a URL's scheme may not be fetched, or None for http(s)."""
    scheme = urlsplit(url).scheme
    return None if scheme.lower() in ALLOWED_SCHEMES else refused_scheme(scheme or "none")


# ---- who we are, and who opted out ----
@functools.lru_cache(maxsize=16)  # importlib.metadata reads the installed files: once per token, not per request
def user_agent(token: Optional[str]) -> str:
    """Our User-Agent: the project, its version and README, and the configured token (img2dataset's form)."""
    try:
        from importlib.metadata import version

        ours = version(PROJECT)
    except Exception:  # noqa: BLE001 - a source checkout that is not installed
        ours = "dev"
    agent = f"{PROJECT}/{ours} (+{PROJECT_README})"
    return f"{agent} (compatible; {token})" if token else agent


def opt_out(values: Iterable[str], token: Optional[str], disallowed: Iterable[str]) -> Optional[str]:
    """The first disallowed directive of X-Robots-Tag header values that applies to us, or None.

    As img2dataset's is_disallowed: `noai, noindex` applies to every agent; `token: noai` to that token only."""
    disallowed = {d.strip().lower() for d in disallowed}
    token = token.strip().lower() if token else None
    for value in values:
        agent, _, directives = value.partition(":") if ":" in value else ("", "", value)
        agent = agent.strip().lower() or None
        if agent is not None and agent != token:
            continue
        for directive in (d.strip().lower() for d in directives.split(",")):
            if directive in disallowed:
                return directive
    return None


# ---- credentials in URLs ----
