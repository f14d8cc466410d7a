"""Fetching images from URLs given by users, safely.

http(s) only; every address the host name resolves to must be public (no loopback, private,
link-local, multicast, reserved or cloud-metadata ranges), checked again on every redirect, and the
connection goes to the address that was checked (no second DNS answer can slip in); connect and read
timeouts; a byte cap. What the bytes are is decided by decoding them, never by the response headers.
"""
import ipaddress
import socket
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import urllib3
from django.conf import settings

MAX_REDIRECTS = 5


class FetchError(Exception):
    """The URL cannot be fetched; str(e) says why, for the person who gave it."""


@dataclass(frozen=True)
class Fetched:
    url: str
    data: bytes


def _public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def _resolve(host: str, port: int) -> str:
    """One checked address for host; FetchError if any address it resolves to is not public."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise FetchError(f"the host {host!r} cannot be resolved") from exc
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not addresses:
        raise FetchError(f"the host {host!r} has no address")
    if not settings.FETCH_ALLOW_PRIVATE_ADDRESSES:
        for address in addresses:
            if not _public(address):
                raise FetchError(
                    f"the host {host!r} resolves to {address}, which is not a public address; only public "
                    "http(s) URLs can be fetched"
                )
    return str(addresses[0])


def fetch_url(url: str, *, max_bytes: int | None = None) -> Fetched:
    """GET url, following up to MAX_REDIRECTS redirects, each checked like the first."""
    max_bytes = max_bytes or settings.MAX_UPLOAD_BYTES
    deadline = time.monotonic() + settings.FETCH_TOTAL_TIMEOUT
    timeout = urllib3.Timeout(connect=settings.FETCH_CONNECT_TIMEOUT, read=settings.FETCH_READ_TIMEOUT)
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FetchError(f"only http and https URLs can be fetched, not {url[:200]!r}")
        if parts.username or parts.password:
            raise FetchError("URLs with a user name or password are not fetched")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise FetchError(f"the URL has an invalid port: {exc}") from exc
        address = _resolve(parts.hostname, port)
        pool_class = urllib3.HTTPSConnectionPool if parts.scheme == "https" else urllib3.HTTPConnectionPool
        extra = {"server_hostname": parts.hostname, "assert_hostname": parts.hostname} if parts.scheme == "https" else {}
        pool = pool_class(address, port, timeout=timeout, retries=False, maxsize=1, **extra)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        try:
            response = pool.urlopen(
                "GET", path, headers={"Host": parts.netloc.rsplit("@", 1)[-1], "User-Agent": "visualsearch/0.1",
                                      "Accept": "image/*"},
                redirect=False, preload_content=False,
            )
        except urllib3.exceptions.HTTPError as exc:
            raise FetchError(f"could not fetch {url[:200]}: {type(exc).__name__}") from exc
        try:
            if response.status in (301, 302, 303, 307, 308):
                location = response.headers.get("Location")
                if not location:
                    raise FetchError(f"{url[:200]} redirected without a Location")
                url = urljoin(url, location)
                continue
            if response.status != 200:
                raise FetchError(f"{url[:200]} answered HTTP {response.status}")
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise FetchError(f"the image at the URL is {int(declared) / 1e6:.1f} MB, over the {max_bytes / 1e6:.1f} MB limit")
            data = bytearray()
            try:
                for chunk in response.stream(64 * 1024):
                    data += chunk
                    if len(data) > max_bytes:
                        raise FetchError(f"the image at the URL is over the {max_bytes / 1e6:.1f} MB limit")
                    if time.monotonic() > deadline:
                        raise FetchError(f"fetching {url[:200]} took over {settings.FETCH_TOTAL_TIMEOUT} s")
            except urllib3.exceptions.HTTPError as exc:
                raise FetchError(f"reading {url[:200]} failed: {type(exc).__name__}") from exc
            return Fetched(url=url, data=bytes(data))
        finally:
            response.release_conn()
            pool.close()
    raise FetchError(f"more than {MAX_REDIRECTS} redirects")
