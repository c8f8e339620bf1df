"""What the processor adds to an event before storing it.

Source and referrer from the Referer URL and UTM tags, browser, operating
system and device type from the User-Agent (ua-parser's maintained rules,
cached: real traffic repeats a few thousand User-Agents, referrers and
campaign links).
"""
from functools import lru_cache
from urllib.parse import parse_qs, urlsplit

import orjson
from ua_parser import parse as parse_user_agent

UTM_TAGS = ("utm_source", "utm_medium", "utm_campaign", "utm_term", "utm_content")
ENRICHED_COLUMNS = ("visitor_id", "referrer", "source") + UTM_TAGS + (
    "browser", "os", "device", "props", "scroll_depth", "engaged_ms")
NOTHING = (None,) * len(ENRICHED_COLUMNS)
NO_UTM = (None,) * len(UTM_TAGS)
TABLET_FAMILIES = ("iPad", "Kindle", "Tablet", "Galaxy Tab", "Nexus 7", "Nexus 9", "Nexus 10")
MOBILE_SYSTEMS = ("iOS", "Android", "Windows Phone", "BlackBerry OS", "KaiOS", "HarmonyOS")


@lru_cache(maxsize=10_000)
def describe_user_agent(user_agent):
    """(browser, os, device type) of a User-Agent; device type is desktop, mobile or tablet."""
    # a NUL (Flask's own server lets one through) may end up in a name ua-parser takes from
    # it, and PostgreSQL text cannot hold one: such a User-Agent tells nothing
    if not user_agent or "\x00" in user_agent:
        return None, None, None
    result = parse_user_agent(user_agent)
    browser = result.user_agent.family if result.user_agent else None
    system = result.os.family if result.os else None
    family = result.device.family if result.device else ""
    # Android phones' browsers say Mobile and Android tablets' do not (Google's rule for
    # telling them apart); Chrome's reduced User-Agent names no device model to go by
    if any(name in family for name in TABLET_FAMILIES) or (system == "Android" and "Mobile" not in user_agent):
        device = "tablet"
    elif system in MOBILE_SYSTEMS or "Mobile" in user_agent:
        device = "mobile"
    else:
        device = "desktop"
    return browser, system, device


def _without_www(host):
    return host[4:] if host.startswith("www.") else host


@lru_cache(maxsize=4096)       # URLs may be long: a bounded few MB
def _referrer_source(site, page_host, referrer):
    """(referrer, source) as stored: a referrer from the site itself is neither.

    The site is the page's own host as much as d: d may name a rollup site or
    be no host name at all.
    """
    try:
        host = _without_www(urlsplit(referrer).hostname or "")
    except ValueError:
        return None, None
    if not host or host == site or host.endswith("." + site) or host == _without_www(page_host or ""):
        return None, None
    return referrer, host


@lru_cache(maxsize=4096)
def _utm(query):
    # no max_num_fields: it raises past the limit, and the API keeps queries short (tracking.MAX_URL)
    values = parse_qs(query)
    # a %00 decodes to NUL, which PostgreSQL text cannot hold: such a tag is left out, as the
    # API leaves out a referrer or prop with one
    return tuple(values[tag][0][:256] if tag in values and "\x00" not in values[tag][0] else None
                 for tag in UTM_TAGS)


def enrich(data):
    """The enriched columns of one queued event (a dict); all None for plain API events."""
    user_agent = data.get("ua")
    if user_agent is None and data.get("visitor_id") is None:
        return NOTHING
    referrer, source = None, None
    if data.get("referrer"):
        referrer, source = _referrer_source(data["site_id"], data.get("host"), data["referrer"])
    query = data.get("query")
    utm = _utm(query) if query else NO_UTM
    source = utm[0] or source
    props = data.get("props")
    return ((data.get("visitor_id"), referrer, source) + utm + describe_user_agent(user_agent)
            + (orjson.dumps(props).decode() if props else None,
               data.get("scroll_depth"), data.get("engaged_ms")))
