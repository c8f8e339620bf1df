"""The baseline for the HTTP figures: a WSGI callable that does nothing.

It reads the request body and answers exactly what POST /event answers
(status, headers and body), so the gap between it and the real app under the
same gunicorn settings is the cost of Flask, validation and the queue append.
"""

BODY = b'{"message":"Event received"}\n'
HEADERS = [("Content-Type", "application/json"), ("Content-Length", str(len(BODY))),
           ("X-Content-Type-Options", "nosniff"), ("Access-Control-Allow-Origin", "*")]


def app(environ, start_response):
    length = int(environ.get("CONTENT_LENGTH") or 0)
    if length:
        environ["wsgi.input"].read(length)
    start_response("200 OK", HEADERS)
    return [BODY]
