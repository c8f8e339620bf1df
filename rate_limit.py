"""Rate limiting of ingestion per client IP: a fixed window over the limits library's storages.

One limit (RATE_LIMIT, for example "100/second") counts the requests of each
client address over POST /event, /events and /api/event together. One check,
IngestRateLimit.hit(), serves the WSGI fast path in front of Flask
(ingest.FastPath) and, as a decorator, the Flask routes that answer the rest
(chunked uploads): the same keys in the same storage, so one bucket, and the
same answer over the limit, 429 with a JSON error and Retry-After.

The counters live where every API process can see them:
- Redis, when the queue is on Redis (QUEUE_URL=redis://...): shared by every
  process on every node, under a key prefix named after the queue's stream;
- otherwise a small file of counters beside the queue (SharedFileStorage),
  shared by the gunicorn workers of one machine, as the file queue is.
RATE_LIMIT_STORAGE_URL names any storage the limits library knows instead.

A client is counted under a keyed hash of its address, never the address: the
counters' keys reach Redis (and its AOF on disk) or the counters file, and the
client IP itself is written nowhere. The hash key is a random secret kept in
the store, which every API process and node already shares for the visitor
salts, so that they all count a client under the same key.
"""
import fcntl
import hashlib
import ipaddress
import logging
import math
import mmap
import os
import struct
import threading
import time
from functools import lru_cache, wraps
from urllib.parse import urlsplit

from flask import request
from limits import parse_many
from limits.errors import ConfigurationError as StorageNotUsable
from limits.storage import Storage, storage_from_string

from config import PERCENT_ENCODE_PASSWORD, REDIS_SCHEMES, ConfigurationError, host_cut_short
from ingest import ApiError
from logs import EverySoOften
from shared_queue import open_for_mapping
from store import StoreUnavailable
from tracking import parse_address

SCOPE = "ingest"
# The secret shares the visitor salts' table under a name that is no UTC day,
# so that it is never among the salts deleted after 48 hours.
SECRET_NAME = "rate-limit key"
SECRET_RETRY = 60.0     # seconds between tries to read it while the database is down
log = logging.getLogger("ingestion_api")


class RateLimited(ApiError):
    def __init__(self, limit, retry_after):
        super().__init__(f"Too many requests: at most {limit} from one client address; "
                         f"retry after {retry_after} s", 429,
                         headers=(("Retry-After", str(retry_after)),))


def ingest_rate_limit(config, client_address, store):
    if not config.rate_limit:
        return NoRateLimit()
    return IngestRateLimit(config, client_address,
                           lambda: store.daily_salt(SECRET_NAME, os.urandom(32), forget_before=""))


class NoRateLimit:
    """RATE_LIMIT=off."""

    def limit(self, view):
        return view

    def hit(self, client_address):
        pass


class IngestRateLimit:
    """The ingest limit: hit() for the fast path, and limit() to decorate Flask routes with it."""

    def __init__(self, config, client_address, load_secret):
        """client_address(remote_addr, headers) gives the address a client is counted by,
        under its hash keyed with the secret load_secret() reads from the store, at the
        first request: a worker restarted while the database is down still boots."""
        self.client_address = client_address
        self.load_secret = load_secret
        self.secret = None
        self._secret_error, self._secret_retry_at = None, 0.0
        self.failures = EverySoOften(log)       # a storage that is down fails every request
        self.items = sorted(parse_many(config.rate_limit))
        self.prefix = _key_prefix(config)
        self.storage = open_storage(config)
        self._keys = lru_cache(maxsize=4096)(self._keys_for)

    def limit(self, view):
        """The fast path's check on a Flask route; OPTIONS preflights are not counted."""
        @wraps(view)
        def limited(*args, **kwargs):
            if request.method == "POST":
                self.hit(lambda: self.client_address(request.remote_addr, request.headers))
            return view(*args, **kwargs)
        return limited

    def hit(self, client_address):
        """Count one request of client_address(); raise RateLimited if that is over the limit.

        The keys, storage and order of the limits library's fixed window: each
        limit from the shortest window up, stopping at the first one breached;
        a client without an address is not counted. The storage is called
        directly with keys cached per address: building a key the way the
        limits library does costs more than the increment itself.
        """
        address = client_address()
        if not address:
            return
        try:
            keys = self._keys(address)
        except StoreUnavailable as error:
            self.failures.warning("rate limit key unavailable; requests let in: %s", error)
            return
        for item, key in keys:
            try:
                allowed = self.storage.incr(key, item.get_expiry()) <= item.amount
                reset = allowed or self.storage.get_expiry(key)
            except Exception as error:  # the limit must not stop ingestion
                self.failures.warning("rate limit storage failed; requests let in: %s", error)
                return
            if not allowed:
                raise RateLimited(item, _seconds_until(reset))

    def client_key(self, address):
        """What the counters know a client by."""
        if self.secret is None:
            # a read waits for the database (5 s): one every SECRET_RETRY, not one per request
            if time.monotonic() < self._secret_retry_at:
                raise StoreUnavailable(self._secret_error)
            try:
                self.secret = self.load_secret()
            except StoreUnavailable as error:
                self._secret_error, self._secret_retry_at = str(error), time.monotonic() + SECRET_RETRY
                raise
        return hashlib.blake2b(address.encode(), key=self.secret, digest_size=16).hexdigest()

    def _keys_for(self, address):
        client = self.client_key(counted_as(address))
        identifiers = (self.prefix, client, SCOPE) if self.prefix else (client, SCOPE)
        return tuple((item, item.key_for(*identifiers)) for item in self.items)


def counted_as(address):
    """An IPv4 address as itself, an IPv6 one as its /64: a subscriber is given a whole /64
    and may send from any of its 2^64 addresses, each of which would have a limit of its own."""
    ip = parse_address(address)         # an IPv4 peer of a socket bound to [::] is IPv4
    if ip is None:
        return address
    if ip.version == 6:
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


def _seconds_until(moment):
    return max(1, math.ceil(moment - time.time()))


def check_storage(config):
    """Stop at start, in one line, on a RATE_LIMIT_STORAGE_URL the limits library cannot use
    (gunicorn's master calls this before any worker builds the app)."""
    if config.rate_limit:
        open_storage(config)


def open_storage(config):
    """The counters' storage; ConfigurationError for an unknown scheme, a storage whose client
    library is not installed, or a malformed URL. Nothing is connected to yet: a server that
    is down lets requests in, as at any other time."""
    url = storage_uri(config)
    try:
        return storage_from_string(url)
    except (StorageNotUsable, ValueError) as error:
        problem = str(error).split(" See https://")[0]      # not its link to the library's docs
        if problem.startswith("unknown storage scheme"):     # which ends with the URL, password and all
            problem = f"unknown storage scheme {urlsplit(url).scheme!r}"
        elif host_cut_short(url):
            problem = PERCENT_ENCODE_PASSWORD
        raise _not_usable(problem) from None


def _not_usable(problem):
    return ConfigurationError(
        f"RATE_LIMIT_STORAGE_URL cannot be used: {str(problem).rstrip('.')}. Unset it to use "
        f"the default, or see RATE_LIMIT_STORAGE_URL in the settings table of README.md.")


def storage_uri(config):
    if config.rate_limit_storage_url:
        return config.rate_limit_storage_url
    if config.queue_path.startswith(REDIS_SCHEMES):
        from redis_queue import _split_stream
        url = _split_stream(config.queue_path)[0]
        # the limits library names a Redis on a unix socket redis+unix://, the Redis client unix://
        return "redis+" + url if url.startswith("unix://") else url
    return "sharedfile://" + os.path.abspath(config.queue_path) + ".ratelimit"


def _key_prefix(config):
    """Installs that share a Redis keep apart, as their queues do."""
    if config.queue_path.startswith(REDIS_SCHEMES):
        from redis_queue import _split_stream
        return _split_stream(config.queue_path)[1]
    return ""


_SLOT = struct.Struct("<QdQ")     # key hash, window end (unix time), count
_SLOTS = 65_536
_PROBES = 8


class SharedFileStorage(Storage):
    """Fixed-window counters in a memory-mapped file, shared by the processes of one machine.

        sharedfile:///path/to/file

    A hash table of 65,536 slots (1.5 MiB) under an exclusive flock, in the
    manner of the file queue: an increment is a lock, a few memory reads and
    writes, and an unlock, with no server to run. Keys are hashed to 64 bits;
    a window whose end has passed frees its slot. When all the slots a key
    may use hold live windows, the one ending first is taken over: that
    client's count starts again (the limit errs towards letting requests in).
    """

    STORAGE_SCHEME = ["sharedfile"]
    _fd = _pid = None       # until opened; __del__ may come first

    def __init__(self, uri, wrap_exceptions=False, **options):
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)
        self.path = uri[len("sharedfile://"):]
        self._thread_lock = threading.Lock()    # flock does not separate threads
        self._pid = None
        self._fd = None
        self._map = None

    @property
    def base_exceptions(self):
        return OSError

    def incr(self, key, expiry, amount=1):
        with self._locked():
            now = time.time()       # under the lock: no window begun later than now is found
            index, count, window_end = self._find(key, now, claim=True, longest=expiry)
            if count == 0:
                window_end = now + expiry
            count += amount
            _SLOT.pack_into(self._map, index * _SLOT.size, _hash(key), window_end, count)
            return count

    def get(self, key):
        with self._locked():
            return self._find(key, time.time(), claim=False)[1]

    def get_expiry(self, key):
        now = time.time()
        with self._locked():
            index, count, window_end = self._find(key, now, claim=False)
        return window_end if count else now

    def check(self):
        try:
            with self._locked():
                return True
        except OSError:
            return False

    def reset(self):
        with self._locked():
            self._map[:] = bytes(len(self._map))
        return None

    def clear(self, key):
        with self._locked():
            index, count, _ = self._find(key, time.time(), claim=False)
            if count:
                _SLOT.pack_into(self._map, index * _SLOT.size, 0, 0.0, 0)

    def _find(self, key, now, claim, longest=math.inf):
        """(slot index, live count, window end) for key; with claim, a slot to write it in.

        Window ends are wall-clock times: one more than longest (the window's length) ahead
        was begun before the clock was set back (NTP, a VM's host), and starts afresh rather
        than last the length of the step on top of its own."""
        wanted = _hash(key)
        first = wanted % _SLOTS
        free = oldest = None
        for probe in range(_PROBES):
            index = (first + probe) % _SLOTS
            slot_hash, window_end, count = _SLOT.unpack_from(self._map, index * _SLOT.size)
            live = window_end > now
            if slot_hash == wanted and live:
                if window_end - now > longest:
                    return index, 0, now
                return index, count, window_end
            if not live and free is None:
                free = index
            if oldest is None or window_end < oldest[1]:
                oldest = (index, window_end)
        if not claim:
            return None, 0, now
        return (free if free is not None else oldest[0]), 0, now

    def _locked(self):
        return _FileLock(self)

    def __del__(self):
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)      # a plain int: nothing else closes it when the app is let go of

    def _open(self):
        # gunicorn forks workers after the app is built: descriptors are per process.
        if self._pid != os.getpid():
            self._fd, self._map, self._pid = None, None, os.getpid()
        if self._fd is None:
            size = _SLOTS * _SLOT.size
            fd = open_for_mapping(self.path, size)     # a full disk: OSError, the request let in
            self._map = mmap.mmap(fd, size)
            self._fd = fd


class _FileLock:
    def __init__(self, storage):
        self.storage = storage

    def __enter__(self):
        self.storage._thread_lock.acquire()
        try:
            self.storage._open()
            fcntl.flock(self.storage._fd, fcntl.LOCK_EX)
        except BaseException:
            self.storage._thread_lock.release()
            raise

    def __exit__(self, *exc):
        try:
            fcntl.flock(self.storage._fd, fcntl.LOCK_UN)
        finally:
            self.storage._thread_lock.release()


@lru_cache(maxsize=4096)
def _hash(key):
    """64 bits of the key, the same in every process (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") or 1
