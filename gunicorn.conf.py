"""gunicorn settings for the ingestion API; gunicorn reads this file from the working directory.

    gunicorn ingestion_api:app                          these settings
    gunicorn -w 4 -b 0.0.0.0:5000 ingestion_api:app     command-line flags override them

Why gthread with two workers per core and four threads each, from the sweep
in bench/RESULTS.md (2 cores, wrk -t2 -c32 on the same machine, one 150-byte
event per POST /event, nothing else running):

    settings                  app requests/s   app p99   bare WSGI app requests/s
    sync -w 2                       5,313        8 ms        10,551
    sync -w 4                       5,990        8 ms        11,208
    gthread -w 2 --threads 8        4,626       17 ms        14,653
    gthread -w 2 --threads 16       3,751       27 ms        10,460
    gthread -w 3 --threads 8        5,360       20 ms        14,024
    gthread -w 4 --threads 4        5,868       25 ms        13,372
    gthread -w 4 --threads 8        5,759       29 ms        14,008

- Two workers per core beat one (5,868 against 4,626 requests/s): Python holds
  one GIL per process, so while one request holds it the other connections of
  that process wait; a second process per core fills the gap. More threads
  than 4-8 only add GIL hand-offs (16: 3,751/s).
- sync -w 4 matched gthread -w 4 --threads 4 in this test (within 2%) with a
  lower p99, but a sync worker is held for the whole of a slow client's
  upload and closes every connection; the API faces browsers directly (the
  README runs gunicorn on 0.0.0.0), where four slow clients would stall it.
  gthread keeps connections alive and parks idle ones in its poller.
- Each worker peaked at ~35 MB resident under load, so four cost ~140 MB.
WEB_CONCURRENCY, gunicorn's own variable, still sets the number of workers.
"""
import logging
import os

bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '5000')}"
worker_class = "gthread"
workers = int(os.environ.get("WEB_CONCURRENCY") or 2 * (os.cpu_count() or 1))
threads = 4


def json_logging(level):
    """LOG_FORMAT=json: gunicorn's lines and the app's on stderr, the access log on stdout,
    one JSON object per line (logs.py)."""
    def stream(formatter, where):
        return {"class": "logging.StreamHandler", "formatter": formatter, "stream": f"ext://sys.{where}"}
    return {
        "root": {"level": level, "handlers": ["errors"]},
        "loggers": {
            "gunicorn.error": {"level": level, "handlers": ["errors"], "propagate": False},
            "gunicorn.access": {"level": "INFO", "handlers": ["access"], "propagate": False},
        },
        "handlers": {"errors": stream("json", "stderr"), "access": stream("access", "stdout")},
        "formatters": {"json": {"()": "logs.JsonFormatter"},
                       "access": {"()": "logs.AccessJsonFormatter"}},
    }


# A bad LOG_FORMAT or LOG_LEVEL is reported by on_starting, with every other
# setting; until then an unknown level is INFO, so that the report gets out.
if os.environ.get("LOG_FORMAT") == "json":
    level = os.environ.get("LOG_LEVEL") or "INFO"
    logconfig_dict = json_logging(level if isinstance(logging.getLevelName(level), int) else "INFO")


def on_starting(server):
    """Bring the schema up to date once, in the master, before any worker starts.

    Workers that open a fresh SQLite database together race to switch it to
    WAL, and the loser fails with "database is locked" (SQLite does not wait
    there), so the worker fails to boot and gunicorn stops. Migrated first, the
    database is already in WAL and each worker's own migrate() is a no-op.
    """
    from config import ConfigurationError, load_config
    from store import open_store

    try:
        config = load_config()
        store = open_store(config)
    except ConfigurationError as error:
        raise SystemExit(f"configuration error: {error}") from None
    try:
        store.migrate()
    finally:
        store.close()
    if config.metrics:
        from metrics import API, use_metrics_directory
        use_metrics_directory(config, API)     # workers inherit PROMETHEUS_MULTIPROC_DIR


def child_exit(server, worker):
    """A worker's live gauges leave with it (prometheus-client's multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(worker.pid)
