"""Prometheus metrics through prometheus-client, served at GET /metrics.

    analytics_events_accepted_total{endpoint}          events queued
    analytics_requests_rejected_total{endpoint,reason}  ingest requests refused: invalid (any
                                                        other 4xx), too_large, rate_limited,
                                                        unavailable, error (a server error)
    analytics_events_dropped_total{reason}              events answered but not kept: bot,
                                                        unknown-site (not in SITES)
    analytics_request_duration_seconds{endpoint}        latency of every endpoint (histogram)
    analytics_queue_size                                acknowledged events not yet stored
    analytics_processor_lag_seconds                     age of the oldest event not yet stored
    analytics_processor_batch_size                      events per stored batch (histogram)
    analytics_processor_batch_duration_seconds          time to store a batch (histogram)
    analytics_processor_dead_letters_total              queued lines that were no valid event
    analytics_processor_failures_total{stage}           failed tries of a batch or a retention window

gunicorn runs each worker as a process of its own, so counters are kept in
prometheus-client's multiprocess mode: every process writes its values to
files in a directory and /metrics adds them up. gunicorn.conf.py points
PROMETHEUS_MULTIPROC_DIR at <METRICS_DIR>/api and clears an earlier run's files
at start; each processor does the same with <METRICS_DIR>/processor, so the API's /metrics
shows the batches of a processor on the same machine too. prometheus-client
reads that variable when it is first imported, hence the imports below are
made only after it is set (or known to be unset).
"""
import atexit
import bisect
import collections
import contextlib
import logging
import os
import threading
import time
import weakref
from functools import partial

from config import ConfigurationError
from logs import EverySoOften
from shared_queue import open_for_mapping

log = logging.getLogger("metrics")

API = "api"
PROCESSOR = "processor"
LATENCY_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5)
BATCH_SIZES = (1, 10, 100, 1000, 2500, 5000, 10_000, 25_000, 50_000)
BATCH_SECONDS = (.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)
FLUSH_EVERY = 0.5       # seconds an API process keeps its counts before writing them out


def use_metrics_directory(config, role):
    """Make <METRICS_DIR>/<role> this process's PROMETHEUS_MULTIPROC_DIR, without what is stale.

    Called once at start (gunicorn's master, each processor) before
    prometheus-client is imported. prometheus-client keeps one file per
    process, named after its pid; files of processes that are gone hold an
    earlier run's values, which would otherwise be added to this one's.
    Files of live processes stay: several processors on one machine share
    the directory, and each one's values must survive the others' starts.
    """
    path = os.path.join(config.metrics_path, role)
    try:
        os.makedirs(path, exist_ok=True)
        names = os.listdir(path)
    except OSError as error:
        raise ConfigurationError(f"METRICS_DIR cannot hold the metrics: {path}: {error.strerror}") from None
    for name in names:
        if not _is_alive(_pid_of(name)):
            with contextlib.suppress(FileNotFoundError):    # another process removed it first
                os.remove(os.path.join(path, name))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


def _reserve_blocks_of_value_files():
    """Make prometheus-client's files of values reserve their blocks on disk, as the queue's do.

    It makes a file, and grows it, with truncate, which leaves it sparse: the
    first store into a page without a block on a full disk is then a SIGBUS
    that kills the process (an API worker, and each one gunicorn starts in its
    place; the processor). Reserved, a full disk is an OSError where the file
    is made or grown, which the callers answer; stores into it cannot fail.
    """
    from prometheus_client import mmap_dict, values

    class ReservedMmapedDict(mmap_dict.MmapedDict):
        def __init__(self, filename, read_mode=False):
            if not read_mode:
                try:
                    os.close(open_for_mapping(filename, mmap_dict._INITIAL_MMAP_SIZE))
                except OSError:
                    # this process's own file (its pid is in the name): left empty, it would
                    # fail every scrape that reads the directory
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(filename)
                    raise
            super().__init__(filename, read_mode)

        def _init_value(self, key):
            # the entry and the capacity it needs, as the base class will compute them
            length = len(key.encode("utf-8"))
            capacity = self._capacity
            while self._used + 4 + length + (8 - (length + 4) % 8) + 16 > capacity:
                capacity *= 2
            if capacity > self._capacity:
                os.close(open_for_mapping(self._fname, capacity))
            super()._init_value(key)

    if values.MmapedDict is mmap_dict.MmapedDict:      # once per process
        values.MmapedDict = ReservedMmapedDict


def _flush_while_alive(flush):
    while True:
        time.sleep(FLUSH_EVERY)
        if not _call_if_alive(flush):
            return


def _call_if_alive(method_ref):
    """Call the method a weakref.WeakMethod refers to; False once its object is gone.

    The method is held only for the call: a thread that kept it while sleeping would keep its
    object alive."""
    method = method_ref()
    if method is None:
        return False
    method()
    return True


def _pid_of(file_name):
    """The pid in prometheus-client's file names (counter_1234.db), or None."""
    pid = file_name.removesuffix(".db").rpartition("_")[2]
    return int(pid) if pid.isdigit() else None


def _is_alive(pid):
    if pid is None or pid == os.getpid():
        return False        # not a process's file, or this pid's previous owner's
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True         # alive, under another user
    return True


def _reason(status):
    # error is kept for the server's own failures, which an alert may page on: a request refused
    # as sent (a 415 for a compressed body) is the client's
    reason = {413: "too_large", 429: "rate_limited", 503: "unavailable"}.get(status)
    return reason or ("invalid" if status < 500 else "error")


class ApiMetrics:
    """What the API counts, and /metrics.

    A request adds to plain counts in memory; a thread writes them to
    prometheus-client's metrics every FLUSH_EVERY seconds, and at exit. In
    multiprocess mode each write to a metric is a write to its memory-mapped
    file, and three of them per request cost as much as the rest of the
    rate limit and metrics together. So a scrape may miss the last
    half-second of another worker's requests; it never counts one twice.
    """

    def __init__(self, config, queue):
        _reserve_blocks_of_value_files()
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.config = config
        self.registry = CollectorRegistry()
        self.live = QueueCollector(queue)
        self.registry.register(self.live)
        self.accepted = Counter("analytics_events_accepted", "Events queued", ["endpoint"],
                                registry=self.registry)
        self.rejected = Counter("analytics_requests_rejected", "Ingest requests refused, by reason",
                                ["endpoint", "reason"], registry=self.registry)
        self.dropped = Counter("analytics_events_dropped", "Events answered but not kept, by reason",
                               ["reason"], registry=self.registry)
        self.latency = Histogram("analytics_request_duration_seconds", "Time to answer a request",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self._lock = threading.Lock()
        self._pending = _Pending()
        self._failures = EverySoOften(log)
        self._flusher = None
        # through a weak reference, as the flusher thread holds it: an app let go of (tests make
        # many) is not kept, with its queue's files, by hooks that cannot be taken back
        os.register_at_fork(after_in_child=partial(_call_if_alive, weakref.WeakMethod(self._forget_flusher)))
        atexit.register(_call_if_alive, weakref.WeakMethod(self.flush))

    def events_accepted(self, endpoint, count):
        with self._lock:
            self._start_flusher()
            self._pending.accepted[endpoint] += count

    def event_dropped(self, reason, count=1):
        with self._lock:
            self._start_flusher()
            self._pending.dropped[reason] += count

    def answered(self, endpoint, status, seconds, ingest=False):
        with self._lock:
            self._start_flusher()
            latency = self._pending.latency_of(endpoint)
            latency[0] += seconds
            latency[1][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1     # the last one: +Inf
            if ingest and status >= 400:
                self._pending.rejected[endpoint, _reason(status)] += 1

    def flush(self):
        """Write the counts kept in memory to the metrics.

        Counts whose file cannot be made or grown (a full disk) are kept for
        the next flush and the failure logged every so often: a worker that
        booted on a full disk writes what it counted meanwhile once there is room.
        """
        with self._lock:
            pending, self._pending = self._pending, _Pending()
        try:
            self._write(pending)
        except OSError as error:
            with self._lock:
                pending.add(self._pending)
                self._pending = pending
            self._failures.warning("metrics not written, kept for the next try: %s", error)

    def _write(self, pending):
        """Write pending's counts, taking each out once written: on an error, the rest are left."""
        for endpoint in list(pending.accepted):
            self.accepted.labels(endpoint).inc(pending.accepted.pop(endpoint))
        for labels in list(pending.rejected):
            self.rejected.labels(*labels).inc(pending.rejected.pop(labels))
        for reason in list(pending.dropped):
            self.dropped.labels(reason).inc(pending.dropped.pop(reason))
        for endpoint in list(pending.latency):
            # what observe() does, once per bucket instead of once per request
            # (prometheus-client's Histogram keeps a value per bucket and one for the sum)
            histogram = self.latency.labels(endpoint)
            total, buckets = pending.latency.pop(endpoint)
            histogram._sum.inc(total)
            for value, count in zip(histogram._buckets, buckets):
                if count:
                    value.inc(count)

    def _start_flusher(self):
        if self._flusher is None:
            flush = weakref.WeakMethod(self.flush)
            self._flusher = threading.Thread(target=_flush_while_alive, args=(flush,), name="metrics",
                                             daemon=True)
            self._flusher.start()

    def _forget_flusher(self):
        # a forked worker has no thread of its parent's, and its own counts start empty
        self._lock = threading.Lock()
        self._pending = _Pending()
        self._flusher = None

    def exposition(self):
        """(body, content type) of GET /metrics: every process's values, then the live ones."""
        self.flush()
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if multiprocess_dir:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=multiprocess_dir)
            registry.register(self.live)
        else:
            registry = self.registry
        processor_dir = os.path.join(self.config.metrics_path, PROCESSOR)
        if os.path.isdir(processor_dir) and processor_dir != multiprocess_dir:
            registry = _Both(registry, processor_dir)
        return generate_latest(registry), CONTENT_TYPE_LATEST


class _Pending:
    """Counts not yet written to the metrics."""

    def __init__(self):
        self.accepted, self.rejected, self.dropped = (collections.Counter() for _ in range(3))
        self.latency = {}       # endpoint -> [sum of seconds, requests per bucket]

    def latency_of(self, endpoint):
        latency = self.latency.get(endpoint)
        if latency is None:
            latency = self.latency[endpoint] = [0.0, [0] * (len(LATENCY_BUCKETS) + 1)]
        return latency

    def add(self, other):
        for mine, theirs in ((self.accepted, other.accepted), (self.rejected, other.rejected),
                             (self.dropped, other.dropped)):
            mine.update(theirs)
        for endpoint, (total, buckets) in other.latency.items():
            latency = self.latency_of(endpoint)
            latency[0] += total
            latency[1] = [a + b for a, b in zip(latency[1], buckets)]


class _Both:
    """A registry's metrics followed by the processor's, read from its directory."""

    def __init__(self, registry, processor_dir):
        from prometheus_client.multiprocess import MultiProcessCollector
        self.registry = registry
        self.processor = MultiProcessCollector(None, path=processor_dir)

    def collect(self):
        yield from self.registry.collect()
        yield from self.processor.collect()


class NoMetrics:
    """METRICS=off: the same calls, nothing kept."""

    def events_accepted(self, endpoint, count):
        pass

    def event_dropped(self, reason, count=1):
        pass

    def answered(self, endpoint, status, seconds, ingest=False):
        pass


class QueueCollector:
    """Queue size and processor lag, read from the queue when /metrics is asked."""

    def __init__(self, queue):
        self.queue = queue
        self._failures = EverySoOften(log)

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        from shared_queue import QueueUnavailable
        try:
            size, age = self.queue.size(), self.queue.oldest_age()
        except (QueueUnavailable, OSError) as error:     # the other metrics are answered all the same
            self._failures.warning("queue gauges left out: %s", error)
            return
        yield GaugeMetricFamily("analytics_queue_size", "Acknowledged events not yet stored",
                                value=size)
        yield GaugeMetricFamily("analytics_processor_lag_seconds",
                                "Age of the oldest event not yet stored (0: none waiting)",
                                value=age)


class ProcessorMetrics:
    """The processor's batches and failures; called after each stored batch and each failed try.

    Their values are made at the first batch, not at start, and a batch whose
    values cannot be made (a disk too full for their file) is left out of them
    and the failure logged every so often: the metrics never stop the processor.
    """

    def __init__(self):
        _reserve_blocks_of_value_files()
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry()
        self._metrics = None
        self._failures = EverySoOften(log)

    def batch_stored(self, size, seconds, dead_letters):
        metrics = self._made()
        if metrics:
            sizes, durations, letters, _ = metrics
            sizes.observe(size)
            durations.observe(seconds)
            letters.inc(dead_letters)

    def failed(self, stage):
        """A try of a batch or of a retention window failed (stage: batch, retention)."""
        metrics = self._made()
        if metrics:
            *_, failures = metrics
            failures.labels(stage).inc()

    def _made(self):
        """The metrics, made at the first call; None (said every so often) while they cannot be."""
        try:
            return self._metrics or self._make_metrics()
        except OSError as error:
            self._failures.warning("batch metrics not written: %s", error)
            return None

    def _make_metrics(self):
        from prometheus_client import Counter, Histogram

        sizes = Histogram("analytics_processor_batch_size", "Queued lines per stored batch",
                          buckets=BATCH_SIZES, registry=None)
        durations = Histogram("analytics_processor_batch_duration_seconds",
                              "Time to read, store and acknowledge a batch",
                              buckets=BATCH_SECONDS, registry=None)
        # the counters are made with the histograms, so that they read 0 and an alert on their
        # increase has a start
        letters = Counter("analytics_processor_dead_letters", "Queued lines that were no valid event, "
                          "written to the dead-letter file", registry=None)
        failures = Counter("analytics_processor_failures", "Failed tries of a batch or a retention window",
                           ["stage"], registry=None)
        for stage in ("batch", "retention"):
            failures.labels(stage)
        self._metrics = sizes, durations, letters, failures
        for metric in self._metrics:
            self.registry.register(metric)
        return self._metrics
