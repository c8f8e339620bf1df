"""Browser traffic: the Plausible Events API payload, client IPs and cookieless visitors.

The request path does only what needs the request itself: map the payload to
our events, find the client IP, hash it into a visitor id (the raw IP goes
nowhere else) and drop bots. Sources, UTM tags and User-Agent details are
worked out later by the processor (enrich.py).
"""
import hashlib
import ipaddress
import os
import threading
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from urllib.parse import unquote, urlsplit

import orjson
from ua_parser import parse as parse_user_agent

from config import UNIX_SOCKET
from events import InvalidEvent, format_timestamp, new_event_id
from rollups import PROP_KEY

MAX_NAME = 120
MAX_URL = 2000
MAX_PROPS = 30
MAX_PROP_VALUE = MAX_URL      # a URL: the trackers' Outbound Link and File Download props
MAX_USER_AGENT = 512
# d names a page's site and the rollups it is also counted in; each gets the whole event, props
# and all, so a 60 KB body naming hundreds of sites was tens of MB of queue and database
MAX_SITES = 10
HEADLESS_FAMILIES = {"HeadlessChrome", "PhantomJS"}


class InvalidPayload(InvalidEvent):
    """Carries Plausible's error shape: {"errors": {field: [message]}}."""

    def __init__(self, field, message):
        super().__init__(f"{field}: {message}")
        self.errors = {field: [message]}


# -- the payload -------------------------------------------------------------

def _first(data, *names):
    for name in names:
        if name in data:
            return data[name]
    return None


def _text(data, field, names, limit, required=True):
    value = _first(data, *names)
    if value is None and not required:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and field == "name":
        value = str(value)
    if not isinstance(value, str) or (required and not value.strip()):
        raise InvalidPayload(field, "is required and must be a string" if required else "must be a string")
    if len(value) > limit:
        raise InvalidPayload(field, f"must be at most {limit} characters")
    if "\x00" in value:
        raise InvalidPayload(field, "must not contain NUL characters")
    return value


def _props(data):
    """p is an object (current tracker) or a JSON string (legacy); values kept as strings."""
    props = _first(data, "p", "props", "m", "meta")
    if props is None:
        return None
    if isinstance(props, str):
        try:
            props = orjson.loads(props)
        except orjson.JSONDecodeError:
            raise InvalidPayload("props", "must be an object or a JSON object string") from None
    if not isinstance(props, dict):
        raise InvalidPayload("props", "must be an object")
    kept = {}
    for key, value in list(props.items())[:MAX_PROPS]:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            continue
        value = str(value)
        if PROP_KEY.fullmatch(key) and len(value) <= MAX_PROP_VALUE and "\x00" not in value:
            kept[key] = value
    return kept or None


def domain_site(domain):
    """The site id of one domain of d: trimmed, lowercased, without a leading www."""
    site = domain.strip().lower()
    return (site[4:] if site.startswith("www.") else site)[:256]


def _sites(domain):
    sites = []
    for part in domain.split(","):
        site = domain_site(part)
        if site and site not in sites:      # one page view is one view of each site
            sites.append(site)
            if len(sites) > MAX_SITES:
                raise InvalidPayload("domain", f"must name at most {MAX_SITES} sites")
    if not sites:
        raise InvalidPayload("domain", "is required")
    return sites


def _page(url, hash_mode):
    try:
        parts = urlsplit(url)
    except ValueError:          # such as an unclosed [ of an IPv6 host
        raise InvalidPayload("url", "must be an absolute http or https URL") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidPayload("url", "must be an absolute http or https URL")
    path = unquote(parts.path) or "/"
    if hash_mode and parts.fragment:
        path += "#" + unquote(parts.fragment)
    if "\x00" in path:
        raise InvalidPayload("url", "must not contain NUL characters")
    return path[:2048], parts.query, parts.hostname


def _number(value, low, high):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return max(low, min(high, int(value)))


def plausible_events(data, now, user_agent, visitor):
    """Our queue events for one Plausible payload (one per domain in d).

    visitor(site) gives the cookieless visitor id of this request for a site.
    """
    if not isinstance(data, dict):
        raise InvalidPayload("payload", "must be a JSON object")
    name = _text(data, "name", ("n", "name"), MAX_NAME)
    url = _text(data, "url", ("u", "url"), MAX_URL)
    domain = _text(data, "domain", ("d", "domain"), 1000)
    referrer = _first(data, "r", "referrer")
    referrer = referrer[:MAX_URL] if isinstance(referrer, str) and "\x00" not in referrer else None
    path, query, host = _page(url, _first(data, "h", "hashMode") in (1, True))
    event_type = "page_view" if name == "pageview" else name
    extra = {"ua": user_agent[:MAX_USER_AGENT], "referrer": referrer or None,
             "query": query[:MAX_URL] or None, "host": host, "props": _props(data)}
    if event_type == "engagement":
        extra.update(scroll_depth=_number(data.get("sd"), 0, 100),
                     engaged_ms=_number(data.get("e"), 0, 86_400_000))
    timestamp = format_timestamp(now)
    return [{"id": new_event_id(), "site_id": site, "event_type": event_type, "path": path, "user_id": None,
             "timestamp": timestamp, "visitor_id": visitor(site), **extra}
            for site in _sites(domain)]


# -- who is asking -------------------------------------------------------------

def parse_address(text):
    """An address as written in a header or by the socket (a port, brackets, quotes around it),
    an IPv4-mapped one as the IPv4 address; None if it is none."""
    text = text.strip().strip('"')
    if text.startswith("["):                      # [v6]:port
        text = text[1:text.find("]")]
    elif text.count(":") == 1:                    # v4:port
        text = text.split(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    # a socket bound to [::] gives IPv4 peers as ::ffff:a.b.c.d, which no IPv4 network contains
    return getattr(address, "ipv4_mapped", None) or address


def _forwarded_chain(headers, on_both):
    forwarded, x_forwarded_for = headers.get("Forwarded"), headers.get("X-Forwarded-For")
    if forwarded and x_forwarded_for:
        # a proxy writes one of them and passes the client's own copy of the other on
        # untouched; which is which cannot be told, so neither is believed
        on_both()
        return []
    if forwarded:
        chain = []
        for element in forwarded.split(","):
            for pair in element.split(";"):
                key, _, value = pair.partition("=")
                if key.strip().lower() == "for":
                    chain.append(value)
        return chain
    return (x_forwarded_for or "").split(",")


def client_ip(remote_addr, headers, trusted, on_both=lambda: None):
    """The socket address, unless it is a trusted proxy: then the nearest untrusted hop
    of Forwarded / X-Forwarded-For. A client cannot forge its address otherwise.

    A peer on a unix socket has no address (""): it is a trusted proxy when
    trusted holds UNIX_SOCKET. on_both is called when a trusted proxy sent both
    headers (then neither is read).
    """
    if not trusted:
        return remote_addr or ""        # the server's own record of the peer: nothing to look past
    if remote_addr:
        address = parse_address(remote_addr)
        if address is None or not _is_trusted(address, trusted):
            return str(address) if address else ""
    elif UNIX_SOCKET in trusted:
        address = None
    else:
        return ""
    for hop in reversed(_forwarded_chain(headers, on_both)):
        hop_address = parse_address(hop)
        if hop_address is None:
            break
        address = hop_address
        if not _is_trusted(address, trusted):
            break
    return "" if address is None else str(address)


def _is_trusted(address, trusted):
    return any(address in network for network in trusted if network != UNIX_SOCKET)


def is_bot(user_agent):
    """Crawlers, headless browsers and requests with no User-Agent at all."""
    # judged on the part the processor describes: a whole header (8 KB) per new User-Agent would
    # make this cache and ua-parser's grow to tens of MB in each API process, and take ua-parser's
    # rules 40 times as long to read
    return _is_bot(user_agent[:MAX_USER_AGENT])


@lru_cache(maxsize=4096)
def _is_bot(user_agent):
    if not user_agent:
        return True
    result = parse_user_agent(user_agent)
    if result.device and result.device.family == "Spider":
        return True
    return bool(result.user_agent and result.user_agent.family in HEADLESS_FAMILIES)


class Visitors:
    """Cookieless visitor ids: a keyed hash of the day's random salt, site, IP and User-Agent.

    Salts live in the store so that every API process and node uses the same
    one; a new one is made for each UTC day and salts older than two days are
    deleted, after which nobody can link a visitor id back to an IP.
    """

    def __init__(self, store):
        self.store = store
        self._lock = threading.Lock()
        self._day = None
        self._salt = None

    def visitor_id(self, site, ip, user_agent, now):
        key = self._salt_for(now.date())
        digest = hashlib.blake2b(f"{site}\n{ip}\n{user_agent}".encode(), key=key, digest_size=16)
        return digest.hexdigest()

    def _salt_for(self, day):
        with self._lock:
            if day != self._day:
                # today's and yesterday's salts are kept: older ones are 48 hours old
                self._salt = self.store.daily_salt(day.isoformat(), os.urandom(32),
                                                   forget_before=(day - timedelta(days=1)).isoformat())
                self._day = day
            return self._salt


def utc_now():
    return datetime.now(timezone.utc)
