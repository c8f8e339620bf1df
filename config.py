"""Settings, read once from the environment.

Every setting has a documented default (see the table in README.md). A bad
value stops the program at start with a message that says how to fix it.
"""
import difflib
import ipaddress
import logging
import os
import re
import socket
import sys
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from events import MAX_LENGTHS

FSYNC_POLICIES = ("never", "batch", "always")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
TRAILING_COMMENT = re.compile(r"\s+#.*")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
MAX_INT = 2**31 - 1         # SQLite, Redis and C take no more
MAX_SECONDS = 86_400
MAX_DAYS = 36_500
# in a URL: user and password before the host (up to the last @: a password may hold one),
# or a password parameter
USER_INFO = re.compile(r"://.*@")
PASSWORD_PARAMETER = re.compile(r"([?&]password=)[^&]*")
SECRET_SETTINGS = ("API_KEYS",)
PERCENT_ENCODE_PASSWORD = "write @ / ? # % and spaces in its password percent-encoded (p/ss is p%2Fss)"
ORIGIN_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")
DEFAULT_PORTS = {"http": 80, "https": 443}       # a browser leaves them out of an origin
UNIX_SOCKET = "unix"        # in TRUSTED_PROXIES: the peer of gunicorn -b unix:..., which has no address


class ConfigurationError(Exception):
    """A setting has a value the program cannot run with."""


@dataclass(frozen=True)
class Config:
    data_dir: str = "."
    queue_url: str = ""          # empty: <data_dir>/event_queue.jsonl
    database_url: str = ""       # empty: <data_dir>/analytics.db
    host: str = "127.0.0.1"
    port: int = 5000
    max_body_bytes: int = 64 * 1024
    max_batch_events: int = 1000
    max_batch_bytes: int = 1024 * 1024
    fsync: str = "never"
    fsync_interval: float = 0.2
    segment_bytes: int = 64 * 1024 * 1024
    processor_batch_size: int = 10_000
    poll_interval: float = 0.05
    log_file: str = ""           # empty: <data_dir>/processor.log
    log_max_bytes: int = 10 * 1024 * 1024   # the log file rotates at this size; 0: never (logrotate)
    report_max_days: int = 3660
    api_keys: tuple = ()
    cors_origins: tuple = ()
    trusted_proxies: tuple = ()
    claim_idle: float = 30.0
    retention_days: int = 0              # 0: keep events forever
    rollup_retention_days: int = 0       # 0: keep per-hour and per-day rollups forever
    retention_batch_size: int = 5000
    retention_interval: float = 1.0
    log_format: str = "text"
    log_level: str = "INFO"
    rate_limit: str = "6000/minute"  # per client IP over the ingest endpoints; "" is off
    rate_limit_storage_url: str = ""  # empty: Redis of QUEUE_URL, else a file beside the queue
    metrics: bool = True
    metrics_dir: str = ""            # empty: <data_dir>/metrics
    sites: frozenset = frozenset()   # the site ids events may be stored for; empty: any

    @property
    def queue_path(self):
        return self.queue_url or os.path.join(self.data_dir, "event_queue.jsonl")

    @property
    def database_path(self):
        return self.database_url or os.path.join(self.data_dir, "analytics.db")

    @property
    def metrics_path(self):
        return self.metrics_dir or os.path.join(self.data_dir, "metrics")

    @property
    def dead_letter_path(self):
        return os.path.join(self.data_dir, "dead_letter.jsonl")

    @property
    def processor_log_path(self):
        return self.log_file or os.path.join(self.data_dir, "processor.log")

    def with_overrides(self, **overrides):
        return replace(self, **overrides)


# environment variable -> (field, parser)
def _number(text, kind, accept, requirement):
    """text read as kind (int or float) if accept holds for it; else the requirement is the error
    (Python's own, "invalid literal for int() with base 10", tells an operator less)."""
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(requirement) from None
    if not accept(value):       # nan and inf fail the bounds too
        raise ValueError(requirement)
    return value


def _positive_int(text):
    return _number(text, int, lambda value: 0 < value <= MAX_INT,
                   f"must be a positive whole number up to {MAX_INT}")


def _port(text):
    # digits alone, as gunicorn.conf.py binds it: int() also reads " 6000" and "6_000", for which
    # gunicorn listened on 5000 without a word
    return _number(text, _digits, lambda value: 0 < value <= 65535, "must be a port number from 1 to 65535")


def _digits(text):
    if not text.isdigit():
        raise ValueError(text)
    return int(text)


def _seconds(text):
    return _number(text, float, lambda value: 0 < value <= MAX_SECONDS,
                   f"must be a positive number of seconds up to {MAX_SECONDS}")


def _bytes_or_zero(text):
    return _number(text, int, lambda value: value >= 0, "must be a number of bytes, or 0 to never rotate")


def _days(text):
    return _number(text, int, lambda value: 0 <= value <= MAX_DAYS,
                   f"must be a number of days up to {MAX_DAYS}, or 0 to keep everything")


def _report_days(text):
    # every day of a range is a point of a timeseries: 3,652,059 of them (years 1 to 9999) took
    # a gigabyte to answer
    return _number(text, int, lambda value: 0 < value <= MAX_DAYS, f"must be a number of days from 1 to {MAX_DAYS}")


def _rate_limit(text):
    if text.lower() == "off":
        return ""
    from limits import parse_many
    try:
        limits = parse_many(text)
    except ValueError:
        raise ValueError('expected "off" or limits such as 100/second or '
                         '"100/second; 3000/minute"') from None
    if any(limit.amount == 0 for limit in limits):
        raise ValueError('a limit of 0 refuses every event; use "off" for no limit')
    return text


def _on_off(text):
    if text.lower() not in ("on", "off"):
        raise ValueError("must be on or off")
    return text.lower() == "on"


def _word_list(text):
    return tuple(word for word in text.replace(",", " ").split() if word)


def _api_keys(text):
    keys = _word_list(text)
    if not keys:        # set, so keys were meant: reports must not be public by mistake
        raise ValueError("it lists no keys; expected keys separated by commas or spaces")
    return _ascii_keys(keys)


def _ascii_keys(keys):
    # a browser or curl sends the header as UTF-8, which the server reads as Latin-1
    if not all(key.isascii() for key in keys):
        raise ValueError("keys must be ASCII: an Authorization header cannot carry other characters")
    return keys


def _keys_file(path):
    try:
        with open(path) as file:
            keys = tuple(key for key in map(_key_in_line, file) if key)
    except OSError as error:
        raise ValueError(f"cannot read it ({error.strerror})") from None
    if not keys:
        raise ValueError("it holds no keys (one key per line)")
    return _ascii_keys(keys)


def _key_in_line(line):
    """A line's key: "" for a comment line, and a trailing comment is cut, so that neither
    a commented-out key nor "key  # whose" is a key. A # inside a key is part of it."""
    text = line.strip()
    if text.startswith("#"):
        return ""
    return TRAILING_COMMENT.sub("", text)


def _origins(text):
    """Origins as a browser writes them in its Origin header, which is compared with each whole."""
    return tuple(word if word == "*" else _origin(word) for word in _word_list(text))


def _origin(word):
    parts = urlsplit(word)
    if not _is_origin(word, parts):
        raise ValueError(f"{word} is not an origin; list each one as a browser sends it, scheme, host and "
                         f"port: https://dash.example.com or http://10.0.0.5:8080 (no path, no wildcard "
                         f"in a name, a host in its ASCII xn-- form; * alone lets every site read them)")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    port = "" if parts.port in (None, DEFAULT_PORTS.get(parts.scheme)) else f":{parts.port}"
    return f"{parts.scheme}://{host}{port}"


def _is_origin(word, parts):
    try:
        parts.port          # a port that is no number, or over 65535, raises
    except ValueError:
        return False
    return bool(ORIGIN_SCHEME.fullmatch(parts.scheme) and parts.hostname and word.isascii() and "*" not in word
                and parts.path in ("", "/") and not (parts.query or parts.fragment or parts.username))


def _sites(text):
    sites = _word_list(text)
    if not sites:
        raise ValueError("it lists no site ids; expected ids separated by commas or spaces, "
                         "such as site1, example.com")
    too_long = next((site for site in sites if len(site) > MAX_LENGTHS["site_id"]), None)
    if too_long:
        raise ValueError(f"the site id {too_long[:40]}... is over {MAX_LENGTHS['site_id']} "
                         f"characters, which no event's site_id may be")
    return frozenset(sites)


def _networks(text):
    """Networks, and the word unix for a proxy on a unix socket (whose peer has no address)."""
    try:
        return tuple(word if word == UNIX_SOCKET else ipaddress.ip_network(word, strict=False)
                     for word in _word_list(text))
    except ValueError as error:
        raise ValueError(f"{error}; expected addresses or CIDR networks such as 10.0.0.0/8, "
                         f"or {UNIX_SOCKET}") from None


def _directory(text):
    if not os.path.isdir(text):
        raise ValueError("no such directory: create it first")
    return text


def _queue_url(text):
    if text.startswith(REDIS_SCHEMES):
        from redis_queue import check_url      # the Redis client is imported only for its queue
        check_url(text)
    return _path_or(text, REDIS_SCHEMES)


def _database_url(text):
    if text.startswith(POSTGRES_SCHEMES):
        from postgres_store import check_url     # psycopg is imported only for its store
        check_url(text)
    return _path_or(text, POSTGRES_SCHEMES)


def _path_or(text, schemes):
    """A URL of one of schemes, or a file path: another URL would be taken for a file name."""
    if "://" in text and not text.startswith(schemes):
        raise ValueError(f"expected a URL starting {' or '.join(schemes)}, or the path of a file")
    return text


def _one_of(choices):
    """One of choices, in any case (gunicorn's --log-level is lower case, our LOG_LEVEL upper)."""
    def parse(text):
        for choice in choices:
            if text.lower() == choice.lower():
                return choice
        raise ValueError("must be one of " + ", ".join(choices))
    return parse


ENVIRONMENT = {
    "DATA_DIR": ("data_dir", _directory),
    "QUEUE_URL": ("queue_url", _queue_url),
    "DATABASE_URL": ("database_url", _database_url),
    "HOST": ("host", str),
    "PORT": ("port", _port),
    "MAX_BODY_BYTES": ("max_body_bytes", _positive_int),
    "MAX_BATCH_EVENTS": ("max_batch_events", _positive_int),
    "MAX_BATCH_BODY_BYTES": ("max_batch_bytes", _positive_int),
    "FSYNC": ("fsync", _one_of(FSYNC_POLICIES)),
    "FSYNC_INTERVAL": ("fsync_interval", _seconds),
    "QUEUE_SEGMENT_BYTES": ("segment_bytes", _positive_int),
    "PROCESSOR_BATCH_SIZE": ("processor_batch_size", _positive_int),
    "PROCESSOR_POLL_INTERVAL": ("poll_interval", _seconds),
    "PROCESSOR_LOG_FILE": ("log_file", str),
    "PROCESSOR_LOG_MAX_BYTES": ("log_max_bytes", _bytes_or_zero),
    "REPORT_MAX_DAYS": ("report_max_days", _report_days),
    "API_KEYS": ("api_keys", _api_keys),
    "API_KEYS_FILE": ("api_keys", _keys_file),
    "CORS_ORIGINS": ("cors_origins", _origins),
    "TRUSTED_PROXIES": ("trusted_proxies", _networks),
    "QUEUE_CLAIM_IDLE": ("claim_idle", _seconds),
    "RETENTION_DAYS": ("retention_days", _days),
    "ROLLUP_RETENTION_DAYS": ("rollup_retention_days", _days),
    "RETENTION_BATCH_SIZE": ("retention_batch_size", _positive_int),
    "RETENTION_INTERVAL": ("retention_interval", _seconds),
    "LOG_FORMAT": ("log_format", _one_of(LOG_FORMATS)),
    "LOG_LEVEL": ("log_level", _one_of(LOG_LEVELS)),
    "RATE_LIMIT": ("rate_limit", _rate_limit),
    "RATE_LIMIT_STORAGE_URL": ("rate_limit_storage_url", str),
    "METRICS": ("metrics", _on_off),
    "METRICS_DIR": ("metrics_dir", str),
    "SITES": ("sites", _sites),
}


# the programs' other variables: gunicorn's, read by gunicorn.conf.py
OTHER_VARIABLES = ("WEB_CONCURRENCY", "GUNICORN_CMD_ARGS")


def warn_of_misspelled_settings(environ=None):
    """Log, at start, each variable that is nearly the name of a setting but not quite.

    Any other program's variable may be set, so it is no error; but DATABSE_URL
    would otherwise leave SQLite in DATA_DIR in place of the server meant without a word.
    """
    environ = os.environ if environ is None else environ
    known = (*ENVIRONMENT, *OTHER_VARIABLES)
    for name in sorted(set(environ) - set(known)):
        meant = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.85)
        if meant:
            logging.getLogger("config").warning("%s is not a setting; did you mean %s?", name, meant[0])


def warn_of_a_keys_file_others_may_read(environ=None):
    """Log, at start, an API_KEYS_FILE that users other than its owner may read.

    It is the user's own file, so its mode is the user's choice and no error; but under the
    common umask 022 it is created readable by every user of the machine, keys and all.
    """
    path = (os.environ if environ is None else environ).get("API_KEYS_FILE")
    try:
        mode = os.stat(path).st_mode & 0o777 if path else 0
    except OSError:         # load_config has said so already
        return
    if mode & 0o077:
        logging.getLogger("config").warning(
            "API_KEYS_FILE %s may be read by other users (mode %o): chmod 600 it, so that only the user "
            "the API runs as reads its keys", path, mode)


def _shown(name, text):
    """A setting as a configuration error names it: without the keys or passwords it holds,
    since the line goes to the journal or a log file that more people read than the settings."""
    if name in SECRET_SETTINGS:
        return name
    return f"{name}={without_password(text)!r}"


def host_cut_short(url):
    """Whether a raw / ? or # in the password of url ends its host before the @: the rest of the
    password is then read as the path or the port, which an error about them would quote."""
    return "@" in url.partition("://")[2][len(urlsplit(url).netloc):]


def without_password(url):
    """url for a log line or an error message: a password in it, before the host or as a
    parameter, is ***."""
    return PASSWORD_PARAMETER.sub(r"\1***", USER_INFO.sub("://***@", url))


def load_config(environ=None, **overrides):
    """Build a Config from environment variables, then apply overrides."""
    environ = os.environ if environ is None else environ
    values = {}
    for name, (attribute, parse) in ENVIRONMENT.items():
        text = environ.get(name)
        if text is None or text == "":
            continue
        try:
            value = parse(text)
            # API_KEYS and API_KEYS_FILE add up
            values[attribute] = values.get(attribute, ()) + value if attribute == "api_keys" else value
        except ValueError as error:
            raise _not_valid(name, text, error) from None
    values.update(overrides)
    return Config(**values)


def stop_at_start(message):
    """Stop a program that cannot start with one line and exit status 2: a service manager told
    RestartPreventExitStatus=2 (deploy/) does not start it again and again, as a bad setting or a
    database newer than the program does not fix itself."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def _not_valid(name, text, reason):
    # the default of a key setting is no keys at all: public reports
    unset = ("unset it to make reports public" if ENVIRONMENT[name][0] == "api_keys"
             else "unset it to use the default")
    return ConfigurationError(f"{_shown(name, text)} is not valid: {reason}. "
                              f"Fix it or {unset}; see the settings table in README.md.")


def check_host(host):
    """Stop at start, in one line, on a HOST that names no address: the servers said only 'Name or
    service not known', gunicorn after five tries. Only the API listens, and so only it looks the
    name up (the processor must not stop when DNS is down), once given the host as its server takes it."""
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):        # UnicodeError: a label over 63 characters
        raise _not_valid("HOST", host, "no address has that name; expected an address of this machine "
                                       "such as 127.0.0.1, 0.0.0.0 or ::1, or a name of one") from None
