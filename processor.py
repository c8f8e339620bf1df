"""The worker: moves events from the queue into the store, exactly once.

    python processor.py                   run until SIGTERM / SIGINT / SIGHUP
    python processor.py --once            drain what is queued now, then exit
    python processor.py import FILE       store the events of a JSON-lines file
    python processor.py export --site S [--from D] [--to D] [--format csv]
    python processor.py rebuild-rollups   recompute the rollups from the events
    python processor.py backup FILE       copy the database while everything runs

Each step reads a batch of lines, stores the valid ones together with the
queue position in one transaction, and only then tells the queue. Lines that
are not valid events go to the dead-letter file with their reason.
"""
import argparse
import logging
import os
import signal
import sys
import threading
import time
from datetime import date, datetime, timezone

import orjson

from tqdm.contrib.logging import tqdm_logging_redirect

import logs
from config import ConfigurationError, load_config, stop_at_start, warn_of_misspelled_settings
from enrich import NOTHING, enrich
from events import InvalidEvent, parse_line
from query_params import parse_day
from reports import Period
from retention import Retention
from shared_queue import QueueBusy, QueueUnavailable, append_whole, open_queue
from store import NotForThisStore, StoreUnavailable, open_store
from transfer import ImportRefused, export_events, import_file

log = logging.getLogger("processor")

MAX_BACKOFF = 30.0
PROGRESS_EVERY = 5.0
LOG_BACKUPS = 5             # processor.log.1 ... processor.log.5
# dead letters of a batch logged in full; the rest are counted in one line (all are in the file): a
# batch of 10,000 bad lines logged 10,000 warnings, which drowned every other line and rotated them away
DEAD_LETTERS_LOGGED = 5


class Processor:
    def __init__(self, queue, store, config, enrichment=True, on_batch=None, on_failure=None):
        self.queue = queue
        self.enrichment = enrichment    # off only to measure what enrichment costs
        self.store = store
        self.config = config
        self.stopping = threading.Event()
        self.on_batch = on_batch        # on_batch(lines, seconds, dead_letters) after each stored batch (metrics)
        self.on_failure = on_failure or (lambda stage: None)   # on_failure("batch") after each failed try
        self.stored = 0
        self.dead = 0
        # lines of a batch not yet stored and acknowledged that are already in the dead-letter
        # file: a retry of the batch (after an outage) reads them again
        self._dead_lettered = set()
        self._consumer = None
        self.retention = Retention(store, config, on_failure=lambda: self.on_failure("retention"))

    def start(self):
        """Migrate the store and claim the queue; raises QueueBusy if taken."""
        self.store.migrate()
        self._consumer = self.queue.consumer(self.store.checkpoint(self.queue.name))
        log.info("processor started queue=%s database=%s backlog=%d",
                 self.queue.describe(), self.store.describe(), self.queue.size())

    def step(self):
        """Store one batch; return how many queued lines it consumed."""
        started = time.monotonic()
        batch = self._consumer.read(self.config.processor_batch_size)
        if not batch.items:
            return 0
        rows, rejected = [], []
        for line in batch.items:
            try:
                row, data = parse_line(line)
            except InvalidEvent as error:
                rejected.append((line, str(error)))
                continue
            rows.append(row + (data.get("id"),) + (self._enriched(data) if self.enrichment else NOTHING))
        if rejected:
            self._dead_letter(rejected)
        self.store.write(rows, self.queue.name, batch.checkpoint)
        self._consumer.acknowledge(batch)
        self._dead_lettered.clear()
        self.stored += len(rows)
        seconds = time.monotonic() - started
        log.debug("batch stored rows=%d rejected=%d seconds=%.3f", len(rows), len(rejected), seconds)
        if self.on_batch:
            self.on_batch(len(batch.items), seconds, len(rejected))
        return len(batch.items)

    @staticmethod
    def _enriched(data):
        """enrich(data); an event it fails on is stored as it came, never retried forever."""
        try:
            return enrich(data)
        except Exception:
            log.exception("enrichment failed; event stored without it: %.200r", data)
            return (data.get("visitor_id"),) + NOTHING[1:]

    def run(self, once=False):
        """Repeat step() until stopped (or, with once, until the queue is empty)."""
        backoff = 0.1
        progress = _Progress()
        held = None         # with once: the newest entry other processors took and have not stored
        try:
            while not self.stopping.is_set():
                try:
                    consumed = self.step()
                    if consumed == 0 and once:
                        waiting, held = held, self._consumer.held_by_others(held)
                        if held is not None and waiting is None:
                            log.info("waiting for the events other processors have taken and not stored "
                                     "(a dead one's are taken over after QUEUE_CLAIM_IDLE, %gs)",
                                     self.config.claim_idle)
                    backoff = 0.1
                except Exception as error:
                    if isinstance(error, (StoreUnavailable, QueueUnavailable)):    # an outage: one line
                        log.warning("batch failed; retrying in %.1fs: %s", backoff, " ".join(str(error).split()))
                    else:
                        log.exception("batch failed; retrying in %.1fs", backoff)
                    self.on_failure("batch")
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
                    continue
                progress.report(self)
                self.retention.step()       # one small window, when due
                if consumed == 0:
                    if once and held is None:
                        self.retention.finish_pass(self.stopping)
                        break
                    self.stopping.wait(self.config.poll_interval)
        finally:
            self.close()
        log.info("processor stopped stored=%d dead_letters=%d", self.stored, self.dead)

    def close(self):
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        self.store.close()

    def _dead_letter(self, rejected):
        """Write rejected lines before their batch is stored: a crash then repeats a letter, never loses one."""
        rejected = [(line, reason) for line, reason in rejected if line not in self._dead_lettered]
        now = datetime.now(timezone.utc).isoformat()
        letters = [(line.decode("utf-8", errors="replace"), reason) for line, reason in rejected]
        append_whole(self.config.dead_letter_path, b"".join(
            orjson.dumps({"reason": reason, "line": text, "at": now}, option=orjson.OPT_APPEND_NEWLINE)
            for text, reason in letters))
        for text, reason in letters[:DEAD_LETTERS_LOGGED]:
            log.warning("dead letter reason=%r line=%.200r", reason, text)
        if len(letters) > DEAD_LETTERS_LOGGED:
            log.warning("dead letters not logged here count=%d file=%s", len(letters) - DEAD_LETTERS_LOGGED,
                        self.config.dead_letter_path)
        self._dead_lettered.update(line for line, _ in rejected)
        self.dead += len(rejected)


class _Progress:
    """Logs throughput every few seconds while there is work."""

    def __init__(self):
        self.last_time = time.monotonic()
        self.last_stored = 0

    def report(self, processor):
        now = time.monotonic()
        if processor.stored == self.last_stored:
            self.last_time = now        # idle: the next rate counts from when work resumes
            return
        if now - self.last_time < PROGRESS_EVERY:
            return
        rate = (processor.stored - self.last_stored) / (now - self.last_time)
        log.info("progress stored=%d rate=%.0f/s backlog=%d dead_letters=%d",
                 processor.stored, rate, processor.queue.size(), processor.dead)
        self.last_time, self.last_stored = now, processor.stored


def setup_logging(config):
    handlers = [logging.StreamHandler(), log_file_handler(config)]
    for handler in handlers:
        handler.setFormatter(logs.formatter(config.log_format))
    logging.basicConfig(level=config.log_level, handlers=handlers, force=True)


def log_file_handler(config):
    """The log file, kept to PROCESSOR_LOG_MAX_BYTES and LOG_BACKUPS older files.

    Processors of a Redis queue on one machine, and the processor's commands
    (import, backup, ...) run beside it, share it: logs.SharedRotatingFileHandler
    writes and rotates under a lock, so that no process renames the file
    another is still writing to.
    With 0 it is never rotated here; it is reopened when moved away, so that
    logrotate (or any tool that renames it) can take over.
    """
    if config.log_max_bytes:
        return logs.SharedRotatingFileHandler(config.processor_log_path, backupCount=LOG_BACKUPS,
                                              maxBytes=config.log_max_bytes)
    return logs.WatchedFileHandler(config.processor_log_path)


def install_signal_handlers(processor):
    """First SIGTERM, SIGINT or SIGHUP: finish the batch and stop. Second: exit at once.

    Returns the exit status once stopped: 0, or 129 after a SIGHUP. That is a closed terminal,
    or a kill -HUP meant as a reload: a service manager's Restart=on-failure starts it again,
    as it did when SIGHUP killed it mid-batch.

    A thread of their own takes the signals (sigwait) instead of a handler. A handler runs
    between two bytecodes of whatever the processor was doing, perhaps writing a log line: a
    line logged from there fails ("reentrant call inside BufferedWriter") with an error that
    skips the rest of the handler, and the stop is lost; Event.set() from there can deadlock
    on the lock of a wait it interrupted. Signals are blocked in the main thread instead.
    """
    signals = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)

    taken = []

    def take_signals():
        first = signal.Signals(signal.sigwait(signals))
        taken.append(first)
        log.info("%s: finishing the current batch, then stopping", first.name)
        processor.stopping.set()
        second = signal.Signals(signal.sigwait(signals))
        log.warning("second %s: exiting now", second.name)
        os._exit(1)

    threading.Thread(target=take_signals, name="signals", daemon=True).start()
    return lambda: 128 + signal.SIGHUP if signal.SIGHUP in taken else 0


def build_parser():
    parser = argparse.ArgumentParser(description="Move queued events into the store: without a COMMAND, "
                                     "until SIGTERM, SIGINT or SIGHUP (the first finishes the batch, a second "
                                     "exits at once).")
    parser.add_argument("--once", action="store_true",
                        help="without a COMMAND: drain the queue, then exit (for scripts and tests)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name, summary):
        sub = commands.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")
        sub.set_defaults(command_parser=sub)    # for errors in the words of its usage
        return sub
    importer = command("import", "store the events of a JSON-lines file, validated like POST /event; "
                       "run again, it goes on where it stopped; exit status 3 if lines were rejected")
    importer.add_argument("file", help="one event per line, as POST /event takes it")
    exporter = command("export", "write a site's events to standard output, in time order")
    exporter.add_argument("--site", required=True, help="the site_id whose events to write")
    exporter.add_argument("--from", dest="start", metavar="YYYY-MM-DD", type=day,
                          help="the first UTC day, included (default: the first there is)")
    exporter.add_argument("--to", dest="end", metavar="YYYY-MM-DD", type=day,
                          help="the last UTC day, included (default: the last there is)")
    exporter.add_argument("--format", choices=("jsonl", "csv"), default="jsonl",
                          help="JSON lines (the default; import reads them) or CSV")
    command("rebuild-rollups", "recompute every rollup from the events table")
    backup = command("backup", "copy the SQLite database while everything runs (PostgreSQL: use pg_dump)")
    backup.add_argument("file", help="the copy to write; must not exist yet")
    return parser


def day(text):
    """A --from or --to argument: a real day, written YYYY-MM-DD."""
    parsed = parse_day(text)
    if parsed is None:
        raise argparse.ArgumentTypeError(f"expected a date as YYYY-MM-DD, got {text!r}")
    return parsed


def export_period(args):
    """The days an export covers: any range (REPORT_MAX_DAYS bounds reports, not exports).

    --from alone runs to the last day there is, --to alone from the first.
    """
    if args.start is None and args.end is None:
        return Period()
    return Period(args.start or date.min, args.end or date.max)


def run_command(args, config):
    store = open_store(config)
    if args.command == "backup":
        # the database as it is: the new version's backup taken before an upgrade, while the old
        # version runs, must not migrate it under that version's processor
        return back_up(store, args.file)
    store.migrate(create=args.command == "import")
    if args.command == "import":
        stored, rejected = import_file(store, args.file, show_progress=sys.stderr.isatty(),
                                       sites=config.sites)
        log.info("import finished file=%s stored=%d rejected=%d", args.file, stored, rejected)
        return 0 if rejected == 0 else 3
    if args.command == "export":
        sys.stdout.reconfigure(encoding="utf-8")    # JSON lines are UTF-8, whatever the locale
        count = export_events(store, sys.stdout, args.site, export_period(args), args.format)
        log.info("export finished site=%s events=%d", args.site, count)
        return 0
    with tqdm_logging_redirect(total=None, unit="events", unit_scale=True, desc="rebuild",
                               disable=not sys.stderr.isatty()) as bar:     # log lines above the bar
        def progress(done, total):
            bar.total = total
            bar.update(done - bar.n)
            if not sys.stderr.isatty():
                log.info("rebuild progress events=%d of %d", done, total)
        store.rebuild_rollups(progress)
    log.info("rollups rebuilt")
    return 0


def back_up(store, destination):
    if os.path.exists(destination):
        log.error("backup failed: %s exists; name a new file", destination)
        return 2
    log.info("backup started database=%s file=%s", store.describe(), destination)
    started = time.monotonic()
    store.backup(destination)
    log.info("backup finished file=%s bytes=%d seconds=%.1f", destination,
             os.path.getsize(destination), time.monotonic() - started)
    return 0


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.once and args.command:
        parser.error(f"--once drains the queue without a COMMAND; {args.command} does not take it")
    if args.command == "export" and args.start and args.end and args.start > args.end:
        args.command_parser.error(f"--to {args.end} is before --from {args.start}")
    try:
        config = load_config()
    except ConfigurationError as error:
        stop_at_start(f"configuration error: {error}")
    try:
        setup_logging(config)
    except OSError as error:
        # the file named is the log or the lock file beside it, whichever failed
        stop_at_start(f"cannot open the log file (PROCESSOR_LOG_FILE): {error.filename}: {error.strerror}")
    warn_of_misspelled_settings()
    return run_command_safely(args, config) if args.command else run_processor(args, config)


def run_command_safely(args, config):
    """A COMMAND's exit status: its failures are one log line, a signal stops it as Ctrl-C does."""
    for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop, interrupt)
    try:
        return run_command(args, config)
    except BrokenPipeError:
        # the reader stopped early (export | head): end quietly, as Unix tools do; stdout
        # goes nowhere so that flushing it at exit does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except (OSError, ImportRefused, NotForThisStore, StoreUnavailable) as error:
        log.error("%s failed: %s", args.command, " ".join(str(error).split()))     # one line
        return 2
    except KeyboardInterrupt as stop:
        # the open transaction rolled back; an import keeps the position of its last batch
        resume = "; run it again to resume where it stopped" if args.command == "import" else ""
        log.warning("%s interrupted%s", args.command, resume)
        return 128 + (stop.args[0] if stop.args else signal.SIGINT)


def run_processor(args, config):
    """Move queued events into the store until stopped (or, --once, until the queue is empty)."""
    try:
        metrics = processor_metrics(config)
    except ConfigurationError as error:
        stop_at_start(f"configuration error: {error}")
    processor = Processor(open_queue(config), open_store(config), config,
                          on_batch=metrics and metrics.batch_stored, on_failure=metrics and metrics.failed)
    exit_status = install_signal_handlers(processor)
    try:
        if not start_when_reachable(processor):
            return 0
    except QueueBusy as error:
        log.error("%s", error)
        return 1
    except StoreUnavailable as error:
        log.error("cannot start: %s", error)
        return 2
    processor.run(once=args.once)
    return exit_status()


def interrupt(signum, frame):
    """A command stops on SIGTERM (a service manager, kill) and SIGHUP (its terminal or ssh session
    closed) as it does on Ctrl-C: a backup cut short removes its partial copy, an import says it resumes."""
    raise KeyboardInterrupt(signum)


def processor_metrics(config):
    """The processor's counts for /metrics (see metrics.py), or None with METRICS=off."""
    if not config.metrics:
        return None
    from metrics import PROCESSOR, ProcessorMetrics, use_metrics_directory
    use_metrics_directory(config, PROCESSOR)
    return ProcessorMetrics()


def start_when_reachable(processor):
    """Start, retrying while the queue or the store is down; False if stopped meanwhile.

    A processor started together with its database (compose, systemd) must
    wait for it rather than exit. Only a queue taken by another processor
    and a SQLite file that cannot be opened are final.
    """
    backoff = 0.5
    while not processor.stopping.is_set():
        try:
            processor.start()
            return True
        except QueueBusy:
            raise
        except Exception as error:
            if isinstance(error, StoreUnavailable) and error.lasting:
                raise
            log.warning("cannot start yet: %s; retrying in %.1fs", error, backoff)
            processor.stopping.wait(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)
    return False


if __name__ == "__main__":
    sys.exit(main())
