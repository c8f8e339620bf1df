"""The worker: moves events from the queue into the store, exactly once.

    python processor.py           run until SIGTERM / SIGINT
    python processor.py --once    drain what is queued now, then exit

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
from datetime import datetime, timezone

import orjson

from config import ConfigurationError, load_config
from events import InvalidEvent, row_from_line
from shared_queue import QueueBusy, open_queue
from store import open_store

log = logging.getLogger("processor")

MAX_BACKOFF = 30.0
PROGRESS_EVERY = 5.0


class Processor:
    def __init__(self, queue, store, config):
        self.queue = queue
        self.store = store
        self.config = config
        self.stopping = threading.Event()
        self.stored = 0
        self.dead = 0
        self._consumer = None

    def start(self):
        """Migrate the store and claim the queue; raises QueueBusy if taken."""
        self.store.migrate()
        self._consumer = self.queue.consumer(self.store.checkpoint(self.queue_name))
        log.info("processor started queue=%s database=%s backlog=%d",
                 self.queue.path, self.store.path, self.queue.size())

    @property
    def queue_name(self):
        return os.path.basename(self.queue.path)

    def step(self):
        """Store one batch; return how many queued lines it consumed."""
        batch = self._consumer.read(self.config.processor_batch_size)
        if not batch.items:
            return 0
        rows, rejected = [], []
        for line in batch.items:
            try:
                rows.append(row_from_line(line))
            except InvalidEvent as error:
                rejected.append((line, str(error)))
        if rejected:
            self._dead_letter(rejected)
        self.store.write(rows, self.queue_name, batch.checkpoint)
        self._consumer.acknowledge(batch)
        self.stored += len(rows)
        return len(batch.items)

    def run(self, once=False):
        """Repeat step() until stopped (or, with once, until the queue is empty)."""
        backoff = 0.1
        progress = _Progress()
        try:
            while not self.stopping.is_set():
                try:
                    consumed = self.step()
                    backoff = 0.1
                except Exception:
                    log.exception("batch failed; retrying in %.1fs", backoff)
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
                    continue
                progress.report(self)
                if consumed == 0:
                    if once:
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
        now = datetime.now(timezone.utc).isoformat()
        with open(self.config.dead_letter_path, "ab") as file:
            for line, reason in rejected:
                text = line.decode("utf-8", errors="replace")
                file.write(orjson.dumps({"reason": reason, "line": text, "at": now},
                                        option=orjson.OPT_APPEND_NEWLINE))
                log.warning("dead letter reason=%r line=%.200r", reason, text)
        self.dead += len(rejected)


class _Progress:
    """Logs throughput every few seconds while there is work."""

    def __init__(self):
        self.last_time = time.monotonic()
        self.last_stored = 0

    def report(self, processor):
        now = time.monotonic()
        if now - self.last_time < PROGRESS_EVERY or processor.stored == self.last_stored:
            return
        rate = (processor.stored - self.last_stored) / (now - self.last_time)
        log.info("progress stored=%d rate=%.0f/s backlog=%d dead_letters=%d",
                 processor.stored, rate, processor.queue.size(), processor.dead)
        self.last_time, self.last_stored = now, processor.stored


def setup_logging(config):
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    handlers = [logging.StreamHandler(), logging.FileHandler(config.processor_log_path)]
    for handler in handlers:
        handler.setFormatter(formatter)
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True)


def install_signal_handlers(processor):
    """First signal: finish the batch and exit 0. Second: exit at once."""
    def handle(signum, frame):
        if processor.stopping.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s: finishing the current batch, then stopping", signal.Signals(signum).name)
        processor.stopping.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Move queued events into the store.")
    parser.add_argument("--once", action="store_true",
                        help="drain the queue, then exit (for scripts and tests)")
    args = parser.parse_args(argv)
    try:
        config = load_config()
    except ConfigurationError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    setup_logging(config)
    processor = Processor(open_queue(config), open_store(config), config)
    try:
        processor.start()
    except QueueBusy as error:
        log.error("%s", error)
        return 1
    install_signal_handlers(processor)
    processor.run(once=args.once)
    return 0


if __name__ == "__main__":
    sys.exit(main())
