"""The queue on a Redis Stream, for several API nodes and several processors.

    QUEUE_URL=redis://host:6379/0               stream "analytics:events"
    QUEUE_URL=redis://host:6379/0?stream=name   another stream

Ingestion adds a request's events in one MULTI/EXEC round trip. Processors
read as members of one consumer group, acknowledge entries only after the
store has committed them, and claim the entries of a processor that died
once they have been idle for QUEUE_CLAIM_IDLE seconds. Entries every
processor has acknowledged are trimmed, so memory stays bounded.
"""
import logging
import os
import re
import socket
import threading
import time
from contextlib import contextmanager
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis

from config import PERCENT_ENCODE_PASSWORD, host_cut_short
from shared_queue import Batch, QueueUnavailable

log = logging.getLogger("queue")

GROUP = "processors"
FIELD = b"e"
TRIM_EVERY = 10_000         # acknowledged entries between two trims
FORGET_CONSUMER_MS = 3_600_000
DATABASE_NUMBER = re.compile(r"(/\d*)?")


def _split_stream(url):
    """(the URL for the client, the stream): stream is our option, not the client's.

    Cut at "?" by hand: urlunsplit would turn unix:///path into unix:/path.
    """
    base, _, query = url.partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True))
    stream = options.pop("stream", "analytics:events")
    if not stream:
        raise ValueError("stream= names no stream")
    return (f"{base}?{urlencode(options)}" if options else base), stream


def check_url(url):
    """Raise ValueError naming what is wrong with a queue URL, without connecting."""
    try:
        _check_parts(url)
    except ValueError:
        if host_cut_short(url):
            raise ValueError(PERCENT_ENCODE_PASSWORD) from None
        raise


def _check_parts(url):
    parts = urlsplit(url)
    if parts.scheme != "unix" and not DATABASE_NUMBER.fullmatch(parts.path):
        # the client reads a path that is no number as database 0, whatever it says
        raise ValueError(f"the path {parts.path!r} is no database number: expected one such as /0 "
                         f"(a stream is named with ?stream=name)")
    try:
        # a connection object is made, not connected: it is what refuses an unknown option
        _new_client(_split_stream(url)[0]).connection_pool.make_connection()
    except (TypeError, ValueError) as error:      # an unknown option, a port that is no number
        raise ValueError(f"not a Redis URL this client takes ({error})") from None


def _new_client(url):
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=30)


class RedisQueue:
    def __init__(self, url, claim_idle=30.0):
        self.url, self.stream = _split_stream(url)
        self.claim_idle_ms = int(claim_idle * 1000)
        self._client = None
        self._client_lock = threading.Lock()

    @property
    def name(self):
        return f"redis:{self.stream}"

    def describe(self):
        """Where the queue is, for the log: never the password, which the URL may carry."""
        parts = urlsplit(self.url)
        if parts.scheme == "unix":          # a socket's path, and its database as an option
            db = dict(parse_qsl(parts.query)).get("db")
            return f"unix://{parts.path}{f'?db={db}' if db else ''} stream={self.stream}"
        return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path} stream={self.stream}"

    @property
    def client(self):
        # One client per queue: a second one made by a racing thread would be
        # garbage-collected and close the connections the first thread is using.
        with self._client_lock:
            if self._client is None:
                self._client = _new_client(self.url)
            return self._client

    def append(self, lines):
        try:
            pipe = self.client.pipeline(transaction=True)
            for line in lines:
                pipe.xadd(self.stream, {FIELD: line.rstrip(b"\n")})
            pipe.execute()
        except redis.TimeoutError as error:         # sent, maybe executed: no answer in time
            raise QueueUnavailable(f"Redis did not answer in time: {error}", maybe_stored=True) from error
        except redis.RedisError as error:
            raise QueueUnavailable(f"cannot write to Redis: {error}") from error

    def size(self):
        """Entries not yet delivered plus delivered but not acknowledged: two counters Redis keeps."""
        try:
            groups = {g["name"].decode(): g for g in self.client.xinfo_groups(self.stream)}
        except redis.ResponseError:
            return 0                                   # no stream yet
        except redis.RedisError as error:
            raise QueueUnavailable(f"cannot reach Redis: {error}") from error
        group = groups.get(GROUP)
        if group is None:
            return self.client.xlen(self.stream)
        if group.get("lag") is None:                  # Redis cannot tell after some deletions
            return group["pending"] + len(self.client.xrange(self.stream, min=b"(" + group["last-delivered-id"]))
        return group["pending"] + group["lag"]

    def oldest_age(self):
        """Seconds since the oldest entry not yet acknowledged was added; 0 if none is waiting.

        Entry ids start with the milliseconds of their XADD: the oldest is the
        first pending one, or else the first after the group's last delivery.
        """
        try:
            groups = {g["name"].decode(): g for g in self.client.xinfo_groups(self.stream)}
            group = groups.get(GROUP)
            if group is None:
                entries = self.client.xrange(self.stream, count=1)
            elif group["pending"]:
                entries = [(self.client.xpending(self.stream, GROUP)["min"], None)]
            else:
                entries = self.client.xrange(self.stream, min=b"(" + group["last-delivered-id"], count=1)
        except redis.ResponseError:
            return 0.0                                 # no stream yet
        except redis.RedisError as error:
            raise QueueUnavailable(f"cannot reach Redis: {error}") from error
        if not entries:
            return 0.0
        added_ms = int(entries[0][0].split(b"-")[0])
        return max(0.0, time.time() - added_ms / 1000)

    def check_writable(self):
        try:
            memory = self.client.info("memory")
        except redis.ResponseError:
            return          # INFO denied to this user by an ACL: Redis answered, all we can tell
        except redis.RedisError as error:
            raise QueueUnavailable(f"cannot reach Redis: {error}") from error
        # Redis refuses writes while what it counts against maxmemory is over it (it evicts
        # what its policy lets it first)
        limit, used = memory.get("maxmemory", 0), memory.get("used_memory", 0)
        if limit and used - memory.get("mem_not_counted_for_evict", 0) > limit:
            raise QueueUnavailable(f"Redis is full: used_memory {used} is over maxmemory {limit}")

    def close(self):
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def consumer(self, checkpoint=None):
        """checkpoint is not needed: Redis remembers what each processor has acknowledged."""
        return RedisConsumer(self)


class RedisConsumer:
    def __init__(self, queue):
        self.queue = queue
        self.name = f"{socket.gethostname()}-{os.getpid()}"
        self._claim_from = "0-0"
        self._acknowledged = 0
        with _reaching_redis():
            self._create_group()
            self._warn_if_evicting()

    def _warn_if_evicting(self):
        try:
            policy = self.queue.client.info("memory").get("maxmemory_policy", "")
        except redis.ResponseError:
            return                      # INFO denied to this user by an ACL
        if policy.startswith("allkeys-"):
            log.warning("Redis may evict the stream %s with the events not yet stored in it: its "
                        "maxmemory-policy is %s; set it to noeviction, so that a full Redis refuses "
                        "events (503) instead of losing accepted ones", self.queue.stream, policy)

    def _create_group(self):
        try:
            self.queue.client.xgroup_create(self.queue.stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" in str(error):
                return
            # a Redis at maxmemory refuses XGROUP CREATE even for a group that exists: a
            # processor started then must read all the same, as reading is what frees memory
            if not (isinstance(error, redis.OutOfMemoryError) and self._group_exists()):
                raise

    def _group_exists(self):
        groups = self.queue.client.xinfo_groups(self.queue.stream)
        return any(group["name"].decode() == GROUP for group in groups)

    def read(self, max_items):
        """Our own unacknowledged entries first (a batch that failed to store), then
        those of dead processors (idle past claim_idle), then new ones.

        A Redis that came back without the group (restarted without its data, the
        key deleted) has only entries queued since: the group is made again from
        the start of the stream, and reading goes on.
        """
        try:
            with _reaching_redis():
                return self._read(max_items)
        except redis.ResponseError as error:
            if "NOGROUP" not in str(error):
                raise
            log.warning("the stream %s has no group %s (Redis lost its data?): creating it again",
                        self.queue.stream, GROUP)
            self._claim_from = "0-0"
            self._create_group()
            return self._read(max_items)

    def _read(self, max_items):
        client, stream = self.queue.client, self.queue.stream
        entries = []
        for _, mine in client.xreadgroup(GROUP, self.name, {stream: "0"}, count=max_items) or []:
            entries += mine
        if len(entries) < max_items:
            self._claim_from, claimed, _ = client.xautoclaim(
                stream, GROUP, self.name, self.queue.claim_idle_ms, self._claim_from,
                count=max_items - len(entries))
            entries += claimed
        if len(entries) < max_items:
            for _, new in client.xreadgroup(GROUP, self.name, {stream: ">"},
                                            count=max_items - len(entries)) or []:
                entries += new
        entries = list(dict(entries).items())     # an entry of ours may also come back claimed
        if not entries and self._acknowledged:
            # drained: trim now, not only every TRIM_EVERY entries, or a stream whose processors
            # restart more often than that would never be trimmed
            self.trim()
        return Batch(items=[fields[FIELD] for _, fields in entries if fields],
                     checkpoint=None, receipts=[entry_id for entry_id, _ in entries])

    def held_by_others(self, up_to=None):
        """The id of the newest entry other processors have read and not acknowledged, or
        None; with up_to, whether any up to that one is still unacknowledged (up_to or None).

        --once waits for these: a live processor stores them within a batch, and the entries
        of a dead one are claimed here once idle for QUEUE_CLAIM_IDLE. It waits for those of
        its first look only, or the batches of a busy processor beside it would keep it forever.
        """
        client, stream = self.queue.client, self.queue.stream
        with _reaching_redis():
            if up_to is None:
                pending = client.xpending(stream, GROUP)
                return pending["max"] if pending["pending"] else None
            return up_to if client.xpending_range(stream, GROUP, "-", up_to, 1) else None

    def acknowledge(self, batch):
        if not batch.receipts:
            return
        with _reaching_redis():
            self.queue.client.xack(self.queue.stream, GROUP, *batch.receipts)
            self._acknowledged += len(batch.receipts)
            if self._acknowledged >= TRIM_EVERY:
                self.trim()

    def trim(self):
        """Drop entries every group has acknowledged: those before the oldest pending one
        (or, with none pending, before the last one delivered)."""
        client, stream = self.queue.client, self.queue.stream
        floors = []
        for group in client.xinfo_groups(stream):
            pending = client.xpending(stream, group["name"])
            floors.append(pending["min"] if pending["pending"] else group["last-delivered-id"])
        if floors:
            client.xtrim(stream, minid=min(floors, key=_entry_order), approximate=False)
        for consumer in client.xinfo_consumers(stream, GROUP):
            if consumer["pending"] == 0 and consumer["idle"] > FORGET_CONSUMER_MS:
                client.xgroup_delconsumer(stream, GROUP, consumer["name"])
        self._acknowledged = 0

    def close(self):
        self.queue.close()


@contextmanager
def _reaching_redis():
    """A Redis that cannot be reached now is an outage the processor waits out (QueueUnavailable)."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as error:
        raise QueueUnavailable(f"cannot reach Redis: {error}") from error


def _entry_order(entry_id):
    milliseconds, _, sequence = entry_id.partition(b"-")
    return int(milliseconds), int(sequence or 0)
