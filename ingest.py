"""Taking events in: POST /event, POST /events and POST /api/event.

Each endpoint is a method of Ingest that turns a request body into an Answer
(status, body, content type, extra headers) or raises an error that
error_answer turns into one. Two callers share them, so they answer alike
byte for byte:

- the Flask routes in ingestion_api.py, and
- FastPath, a plain WSGI layer in front of Flask that answers these POSTs
  itself. Flask's own dispatch (request context, URL matching, Response
  objects, hooks) costs more than the ingestion does, and these endpoints
  take nearly all the traffic. Anything it does not handle (other paths and
  methods, a body without a Content-Length) goes on to Flask unchanged.
"""
import logging
import sys
import time
from typing import NamedTuple

import orjson
from werkzeug.datastructures import EnvironHeaders
from werkzeug.exceptions import BadRequest, HTTPException, InternalServerError, RequestEntityTooLarge
from werkzeug.http import HTTP_STATUS_CODES

from events import InvalidEvent, encode_event, encode_valid_events, parse_json, validate_event
from config import UNIX_SOCKET
from logs import EverySoOften
from shared_queue import QueueUnavailable
from store import StoreUnavailable
from tracking import InvalidPayload, client_ip, domain_site, is_bot, plausible_events, utc_now

log = logging.getLogger("ingestion_api")

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
# Ingestion is open and sends no cookies, so any page may send events and read the answer:
# a page that cannot read it sees a failure even when the event was taken, and may send it again.
ANY_ORIGIN = (("Access-Control-Allow-Origin", "*"),)
# on every answer: a browser must not run a report or a JSON error as a script or a page
# because it looks like one
NOSNIFF = (("X-Content-Type-Options", "nosniff"),)
INGEST_PATHS = ("/event", "/events", "/api/event")


class Answer(NamedTuple):
    status: int
    body: bytes
    content_type: str = JSON
    headers: tuple = ()


EVENT_RECEIVED = Answer(200, b'{"message":"Event received"}\n')
PLAUSIBLE_OK = Answer(202, b"ok", TEXT)
BOT_DROPPED = Answer(202, b"ok", TEXT, (("X-Analytics-Dropped", "bot"),))
UNKNOWN_SITE_DROPPED = Answer(202, b"ok", TEXT, (("X-Analytics-Dropped", "unknown-site"),))


class ApiError(Exception):
    """An error answered as {"error": message, ...extra} with a status code."""

    def __init__(self, message, status=400, headers=(), **extra):
        super().__init__(message)
        self.body = {"error": message, **extra}
        self.status = status
        self.headers = headers


class IncompleteBody(BadRequest):
    """A body that ended before its Content-Length or its last chunk: the client stopped sending
    midway, so what came is part of a request, never taken (cut between NDJSON lines, it parses)."""

    description = "Incomplete request body: the connection ended before all of it arrived"


# codings a client compresses a body with; the body is read as it is whatever else Content-Encoding
# says (identity, or a charset some clients put there by mistake)
COMPRESSIONS = frozenset({"gzip", "x-gzip", "deflate", "br", "zstd", "compress", "x-compress"})


def refuse_compressed(content_encoding):
    """A compressed body is a 415 that says so (RFC 7694), not an "Invalid JSON" for its bytes."""
    if not content_encoding:        # nearly every request: nothing to split on the hot path
        return
    codings = {coding.strip() for coding in content_encoding.lower().split(",")}
    if codings & COMPRESSIONS:
        raise ApiError(f"Unsupported Content-Encoding: {content_encoding.strip()[:100]}; "
                       "send the body uncompressed", 415, headers=(("Accept-Encoding", "identity"),))


def body_too_large(limit):
    """The 413 of a body over limit bytes: a client that knows the limit can split a batch to fit."""
    return RequestEntityTooLarge(f"Request body too large: at most {limit} bytes")


def json_answer(body, status=200):
    return Answer(status, orjson.dumps(body) + b"\n")


# an outage fails every report and browser event: one line per 10 s per process, not per request
STORE_FAILURES = EverySoOften(log)


def error_answer(error):
    """The JSON answer to an error raised while taking a request in (or by a report)."""
    if isinstance(error, ApiError):
        return json_answer(error.body, error.status)._replace(headers=error.headers)
    if isinstance(error, InvalidPayload):
        return json_answer({"errors": error.errors}, 400)
    if isinstance(error, StoreUnavailable):
        STORE_FAILURES.warning("database unavailable: %s", error)
        return json_answer({"error": "Database unavailable; retry later"}, 503)
    if isinstance(error, HTTPException):
        # what the status requires, such as Allow on a 405
        headers = tuple((name, value) for name, value in error.get_headers()
                        if name.lower() != "content-type")
        return json_answer({"error": error.description}, error.code)._replace(headers=headers)
    return json_answer({"error": str(error)}, 400)    # InvalidEvent, InvalidParameter


class Ingest:
    """The ingest endpoints, from request body to queue."""

    def __init__(self, config, queue, visitors, metrics):
        self.config = config
        self.queue = queue
        self.visitors = visitors
        self.metrics = metrics
        self.sites = config.sites
        # d is read as domain_site reads it, so a site listed as www.Example.com is example.com,
        # as Plausible stores a site registered that way
        self.plausible_sites = frozenset(map(domain_site, config.sites))
        self.queue_failures = EverySoOften(log)
        self.both_forwarding_headers = EverySoOften(log, seconds=600)
        self.unix_socket_unnamed = EverySoOften(log, seconds=600)

    def client_address(self, remote_addr, headers):
        """The address a client is known by (TRUSTED_PROXIES decides whether headers count)."""
        if not remote_addr and UNIX_SOCKET not in self.config.trusted_proxies:
            self.unix_socket_unnamed.warning(
                "requests come over a unix socket, which gives no client address, so every visitor "
                "looks like one: add %s to TRUSTED_PROXIES if the proxy in front sets "
                "X-Forwarded-For or Forwarded", UNIX_SOCKET)
        return client_ip(remote_addr, headers, self.config.trusted_proxies, self._warn_both_headers)

    def _warn_both_headers(self):
        # visitors behind such a proxy all look like one
        self.both_forwarding_headers.warning(
            "a request from a trusted proxy carried both Forwarded and X-Forwarded-For: it is "
            "counted by the proxy's address; make the proxy drop the header it does not write "
            "(nginx: proxy_set_header Forwarded \"\";)")

    def event(self, body):
        self._append("/event", [encode_event(validate_event(parse_json(body), sites=self.sites))])
        return EVENT_RECEIVED

    def events(self, body, mimetype):
        items = parse_batch(body, mimetype)
        if not items:
            raise ApiError("Invalid batch: no events")
        if len(items) > self.config.max_batch_events:
            raise ApiError(f"Too many events: {len(items)} in one batch, "
                           f"at most {self.config.max_batch_events}")
        now = utc_now()
        lines = encode_valid_events(items, now, self.sites)
        if lines is None:
            lines = []
            for index, item in enumerate(items):
                try:
                    lines.append(encode_event(validate_event(item, now, self.sites)))
                except InvalidEvent as error:
                    raise ApiError(str(error), index=index) from None
        self._append("/events", lines)
        return json_answer({"message": "Events received", "count": len(lines)})

    def plausible(self, user_agent, read_body, remote_addr, headers):
        """A Plausible Events API payload; read_body() raises the 413 of a body over the limit."""
        if is_bot(user_agent):
            log.info("dropped event reason=bot user_agent=%.120r", user_agent)
            self.metrics.event_dropped("bot")
            return BOT_DROPPED
        now = utc_now()
        ip = self.client_address(remote_addr, headers)
        try:
            data = parse_json(read_body())
        except InvalidEvent:
            raise InvalidPayload("payload", "is not valid JSON") from None
        events = plausible_events(data, now, user_agent,
                                  lambda site: self.visitors.visitor_id(site, ip, user_agent, now))
        if self.plausible_sites:
            unknown = [event["site_id"] for event in events if event["site_id"] not in self.plausible_sites]
            if unknown:
                log.info("dropped event reason=unknown-site sites=%.300r user_agent=%.120r",
                         ",".join(unknown), user_agent)
                self.metrics.event_dropped("unknown-site", len(unknown))
                events = [event for event in events if event["site_id"] in self.plausible_sites]
                if not events:
                    return UNKNOWN_SITE_DROPPED
        self._append("/api/event", [encode_event(event) for event in events])
        return PLAUSIBLE_OK

    def _append(self, endpoint, lines):
        try:
            self.queue.append(lines)
        except QueueUnavailable as error:
            self.queue_failures.warning("queue append failed: %s", error)
            if error.maybe_stored:
                raise ApiError("Queue did not answer in time; the event may have been stored", 503) from None
            raise ApiError("Queue unavailable, event not stored; retry later", 503) from None
        self.metrics.events_accepted(endpoint, len(lines))


NDJSON = ("application/x-ndjson", "application/ndjson")


def parse_batch(body, mimetype):
    """A batch body as a list of items; NDJSON indexes count events, as in an array."""
    if mimetype not in NDJSON:
        items = _parse_json_batch(body)
        if not isinstance(items, list):
            raise ApiError("Invalid batch: expected a JSON array of events")
        return items
    items = []
    for index, line in enumerate(line for line in body.splitlines() if line.strip()):
        try:
            items.append(parse_json(line))
        except InvalidEvent as error:
            raise ApiError(str(error), index=index) from None
    return items


def _parse_json_batch(body):
    try:
        return parse_json(body)
    except InvalidEvent:
        lines = body.strip().splitlines()
        if len(lines) > 1 and lines[0].rstrip().endswith(b"}"):      # one event per line
            raise ApiError("Invalid JSON: a batch of one event per line (NDJSON) is sent with "
                           "Content-Type: application/x-ndjson") from None
        raise


STATUS_LINES = {code: f"{code} {name.upper()}" for code, name in HTTP_STATUS_CODES.items()}


class FastPath:
    """WSGI middleware: the ingest POSTs without Flask, everything else through it.

    Installed as app.wsgi_app, so Flask.__call__ (and gunicorn, and the test
    client) reach it first.
    """

    def __init__(self, flask_wsgi, ingest, rate_limit):
        self.flask_wsgi = flask_wsgi
        self.ingest = ingest
        self.rate_limit = rate_limit
        self.metrics = ingest.metrics
        config = ingest.config
        # a body refused unread (413, 415, 429) is read and dropped, up to twice the largest the
        # API takes: the client, or the proxy that sends it on (nginx), sends it all before
        # reading the answer, and meets a closed connection (a reset, or a 502 from the proxy)
        # if the server stops reading first; a larger one is cut off rather than read at length
        self.drain_limit = 2 * max(config.max_body_bytes, config.max_batch_bytes)
        # path -> (handler, body limit, headers added to every answer)
        self.routes = {
            "/event": (lambda environ, body: ingest.event(body()), config.max_body_bytes, ANY_ORIGIN),
            "/events": (lambda environ, body: ingest.events(body(), _mimetype(environ)),
                        config.max_batch_bytes, ANY_ORIGIN),
            "/api/event": (lambda environ, body: ingest.plausible(
                environ.get("HTTP_USER_AGENT", ""), body, environ.get("REMOTE_ADDR"),
                EnvironHeaders(environ)), config.max_body_bytes, ANY_ORIGIN),
        }

    def __call__(self, environ, start_response):
        route = self.routes.get(environ.get("PATH_INFO"))
        length = environ.get("CONTENT_LENGTH", "")
        # isdigit alone admits "²", which int() refuses; Flask answers whatever is not plain digits
        plain_length = length.isascii() and length.isdigit()
        if route is None or environ["REQUEST_METHOD"] != "POST" or not plain_length:
            return self.flask_wsgi(environ, start_response)
        started = time.perf_counter()
        handler, limit, headers = route
        # int() refuses over 4,300 digits; a length of 20 digits is over any limit all the same
        length = int(length) if len(length) < 20 else sys.maxsize

        unread = length

        def read_body():
            nonlocal unread
            if length > limit:
                raise body_too_large(limit)
            refuse_compressed(environ.get("HTTP_CONTENT_ENCODING", ""))
            body = environ["wsgi.input"].read(length)
            unread = 0
            if len(body) < length:
                raise IncompleteBody()
            return body

        try:
            self.rate_limit.hit(lambda: self.ingest.client_address(environ.get("REMOTE_ADDR"),
                                                                   EnvironHeaders(environ)))
            answer = handler(environ, read_body)
        except (ApiError, InvalidEvent, HTTPException, StoreUnavailable) as error:
            answer = error_answer(error)
        except Exception:
            log.exception("error on %s %s", environ["REQUEST_METHOD"], environ["PATH_INFO"])
            answer = error_answer(InternalServerError())
        if 0 < unread <= self.drain_limit:
            discard(environ["wsgi.input"], unread)
        start_response(STATUS_LINES[answer.status],
                       [("Content-Type", answer.content_type),
                        ("Content-Length", str(len(answer.body))), *answer.headers, *NOSNIFF, *headers])
        self.metrics.answered(environ["PATH_INFO"], answer.status, time.perf_counter() - started,
                              ingest=True)
        return [answer.body]


def discard(stream, length):
    """Read and drop length bytes of a request body (fewer if the client stops sending)."""
    try:
        while length > 0:
            chunk = stream.read(min(length, 65536))
            if not chunk:
                return
            length -= len(chunk)
    except OSError:         # the client went away: nothing is left to answer
        return


def _mimetype(environ):
    """The Content-Type without its parameters, as Flask's request.mimetype gives it."""
    return environ.get("CONTENT_TYPE", "").split(";", 1)[0].strip().lower()
