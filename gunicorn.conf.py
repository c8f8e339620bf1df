"""gunicorn settings for the ingestion API; gunicorn reads this file from the working directory.

    gunicorn ingestion_api:app                          these settings
    gunicorn -w 4 -b 0.0.0.0:5000 ingestion_api:app     command-line flags override them

Why sync workers, one per core, from the sweep in bench/RESULTS.md (2 cores,
wrk -t2 -c32 on the same machine, one 150-byte event per POST /event, the
rate limit and metrics on; requests/s, and the ratio to a bare WSGI app that
does nothing under the same settings):

    settings                  app requests/s   bare requests/s   ratio
    sync -w 2                       2,863            3,419         0.84
    sync -w 4                       2,520            3,325         0.76
    gthread -w 2 --threads 8        2,310            3,856         0.60
    gthread -w 4 --threads 4        2,337            3,659         0.64
    gthread -w 4 --threads 8        2,228            3,633         0.61

- An ingest request holds two file locks briefly (the queue's and the rate
  limit's). In a threaded worker, a thread that takes one must then win the
  GIL back from the other threads of its process, and holds the lock while
  it waits; every other process then waits on that lock too. A sync worker
  has no other thread to wait for: the lock is held only for the write.
- A sync worker answers one connection at a time and closes it after the
  answer (no keep-alive), so a client that sends its body slowly holds a
  worker until `timeout` (30 s). On the open internet, put a reverse proxy
  that buffers requests in front (nginx, Caddy: the one that terminates TLS
  does it), or choose threads: GUNICORN_CMD_ARGS="--threads 4" (gunicorn
  switches to gthread by itself when threads > 1).
WEB_CONCURRENCY, gunicorn's own variable, still sets the number of workers.
"""
import json
import logging
import os
import signal
import sys
import time
from datetime import timedelta

from gunicorn import glogging, util
from gunicorn.instrument.statsd import Statsd

# as config.py reads them: empty is unset (an empty HOST must not mean every interface);
# on_starting checks them with the other settings before gunicorn binds. gunicorn reads
# an IPv6 address only in brackets, where python ingestion_api.py takes it bare.
# A PORT that is no number is left to on_starting too, which names the setting, rather than to
# gunicorn, which would stop at once with "'abc' is not a valid port number".
host = (os.environ.get("HOST") or "127.0.0.1").strip("[]")
port = os.environ.get("PORT") or "5000"
bind = f"{f'[{host}]' if ':' in host else host}:{port if port.isdigit() else '5000'}"
worker_class = "sync"
workers = int(os.environ.get("WEB_CONCURRENCY") or max(2, os.cpu_count() or 1))
# gunicorn 25.1+ opens a control socket (for gunicornc) at one path per user,
# $XDG_RUNTIME_DIR/gunicorn.ctl or ~/.gunicorn/gunicorn.ctl, whatever the
# instance: a second instance takes it over and the first one to stop deletes
# it from under the other. Nothing here uses gunicornc, so there is none.
control_socket_disable = True


def write_json_error(sock, status_int, reason, mesg):
    """gunicorn's own answers (a request line or header it cannot parse, a crashed request)
    as JSON like every answer of the app, instead of an HTML page. Workers call
    util.write_error when they answer, so replacing it here, in the master, reaches them all."""
    body = json.dumps({"error": mesg or reason}).encode()       # ASCII: non-ASCII is escaped
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nX-Content-Type-Options: nosniff\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    util.write_nonblock(sock, head.encode("latin-1") + body)


util.write_error = write_json_error


# With --error-logfile, gunicorn points stderr (and stdout) at that file, and reopens it
# with its own on SIGUSR1: the app's lines, which go to stderr (logs.log_to_stderr), then
# stay beside gunicorn's through a logrotate, instead of going to a terminal nobody reads.
capture_output = True


# gunicorn's own format (the combined log format) without the client address, %(h)s: no
# client IP is written anywhere (README, visitors without cookies); JSON lines leave it out too
access_log_format = '- %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"'


# LOG_FORMAT=json in any case, as config.py reads it (the app's own lines follow config.py)
json_lines = (os.environ.get("LOG_FORMAT") or "").lower() == "json"


class Logger(Statsd):
    """gunicorn's logger, with a reopen on SIGUSR1 (logrotate) that is safe in a signal handler,
    and with LOG_FORMAT=json one JSON object per line (logs.py) in gunicorn's own handlers
    (stderr or --error-logfile, stdout or --access-logfile).

    gunicorn swaps in its statsd logger for --statsd-host only in place of its default
    class, so this one is that logger; without --statsd-host it has no socket and sends nothing.
    """

    def setup(self, cfg):
        super().setup(cfg)
        if json_lines:
            from logs import AccessJsonFormatter, JsonFormatter
            for handler in self.error_log.handlers:
                handler.setFormatter(JsonFormatter())
            for handler in self.access_log.handlers:
                handler.setFormatter(AccessJsonFormatter())

    def access(self, resp, req, environ, request_time):
        # gunicorn times a request by the local wall clock, which the end of summer time or a
        # clock set back moves during it: a request of seconds would be logged as 23 hours
        # (duration_ms, and the statsd timing)
        started = getattr(req, "monotonic_start", None)
        if started is not None:
            request_time = timedelta(seconds=time.monotonic() - started)
        if self.sock is None:       # no --statsd-host: no metrics to format for nobody
            glogging.Logger.access(self, resp, req, environ, request_time)
        else:
            super().access(resp, req, environ, request_time)

    def reopen_files(self):
        """Point stdout, stderr and every log file at files of their names again.

        A worker does this in its signal handler, which may have interrupted a write to one of
        those very streams. gunicorn's own reopen flushes and closes them there: the write
        fails ("reentrant call inside BufferedWriter"), a "--- Logging error ---" traceback lands
        in the error log, and the error can reach the request being served. This one touches
        nothing that may be in use: it opens the new files and swaps them in; each old stream
        is closed when its last reference goes, at once or when the interrupted write is done.
        """
        if self.cfg.capture_output and self.cfg.errorlog != "-":
            logfile = open(self.cfg.errorlog, "a+")
            os.dup2(logfile.fileno(), sys.stdout.fileno())
            os.dup2(logfile.fileno(), sys.stderr.fileno())
            replaced, self.logfile = self.logfile, logfile
            if replaced is not None:
                replaced.close()        # held only for its descriptor, which the dup2s used
        for log in glogging.loggers():
            for handler in log.handlers:
                if isinstance(handler, logging.FileHandler) and handler.stream:
                    handler.stream = handler._open()


logger_class = Logger
# A bad LOG_FORMAT or LOG_LEVEL is reported by on_starting, with every other
# setting; until then an unknown level is INFO, so that the report gets out.
if json_lines:
    loglevel = os.environ.get("LOG_LEVEL") or "info"
    accesslog = "-"         # on in JSON mode: stdout, unless --access-logfile names a file


def on_starting(server):
    """Bring the schema up to date once, in the master, before any worker starts.

    Workers that open a fresh SQLite database together race to switch it to
    WAL, and the loser fails with "database is locked" (SQLite does not wait
    there), so the worker fails to boot and gunicorn stops. Migrated first, the
    database is already in WAL and each worker's own migrate() is a no-op.
    """
    from config import (
        ConfigurationError, check_host, load_config, stop_at_start, warn_of_a_keys_file_others_may_read,
        warn_of_misspelled_settings)
    from logs import log_to_stderr
    from rate_limit import check_storage
    from store import StoreUnavailable, migrate_store

    if server.cfg.workers < 1:       # gunicorn takes 0, listens, and no request is ever answered
        stop_at_start(f"configuration error: gunicorn needs at least 1 worker "
                      f"(WEB_CONCURRENCY or --workers), not {server.cfg.workers}")
    if server.cfg.preload_app:
        # the app was built already, in this process, before the metrics directory was set
        # (so no worker writes its counts there) and once for all (so a SIGHUP's new workers
        # keep the API keys read at start)
        stop_at_start("configuration error: gunicorn's --preload (preload_app) builds the app "
                      "before this file's settings apply: /metrics would count nothing and SIGHUP "
                      "would not read the API keys again; run without it")
    try:
        config = load_config()
        check_storage(config)
        if bind in server.cfg.bind:       # not when -b (or GUNICORN_CMD_ARGS) chose the address
            check_host(host)
    except ConfigurationError as error:
        stop_at_start(f"configuration error: {error}")
    server.analytics_config = config       # what post_fork builds each worker's app from
    log_to_stderr(config)      # workers inherit it
    warn_of_misspelled_settings()
    warn_of_a_keys_file_others_may_read()
    try:
        migrate_store(config)
    except StoreUnavailable as error:
        stop_at_start(f"cannot start: {error}")
    except KeyboardInterrupt:                 # Ctrl-C while waiting for the database
        raise SystemExit(130) from None
    if config.metrics:
        from metrics import API, use_metrics_directory
        try:
            use_metrics_directory(config, API)     # workers inherit PROMETHEUS_MULTIPROC_DIR
        except ConfigurationError as error:
            stop_at_start(f"configuration error: {error}")


def on_reload(server):
    """SIGHUP: read the settings again for the new workers (a key taken out of API_KEYS_FILE
    stops working). Settings that no longer hold are logged and the workers keep the last good
    ones: one that cannot boot would stop gunicorn, and ingestion with it."""
    from config import ConfigurationError, load_config, warn_of_a_keys_file_others_may_read
    try:
        server.analytics_config = load_config()
    except ConfigurationError as error:
        logging.getLogger("ingestion_api").error(
            "configuration error: %s The workers keep the settings read before.", error)
        return
    warn_of_a_keys_file_others_may_read()


def pre_request(worker, req):
    worker.log.debug("%s %s", req.method, req.path)        # what gunicorn's own does
    req.monotonic_start = time.monotonic()                  # for Logger.access


def post_fork(server, worker):
    """Each worker builds its app from the settings the master checked, at start or at the last
    SIGHUP that found them good, rather than reading them anew: a worker that replaces one that
    crashed or timed out then boots even if the keys file went wrong since. (The app itself is
    built later, when gunicorn loads it, once the worker has its own signal handlers.)"""
    import ingestion_api
    ingestion_api.checked_config = server.analytics_config


def post_worker_init(worker):
    """A resized terminal sends SIGWINCH to every process of gunicorn, workers too, and a
    worker's handler for it only logs (at DEBUG) that it ignores it. Logged from a signal
    handler, that line can interrupt one being written to the same stream, and fails there
    ("reentrant call inside BufferedWriter") with a traceback in the log; the kernel drops
    an ignored signal before any handler runs."""
    signal.signal(signal.SIGWINCH, signal.SIG_IGN)


def child_exit(server, worker):
    """A worker's live gauges leave with it (prometheus-client's multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(worker.pid)
