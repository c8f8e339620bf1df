-- One ~150-byte event per POST /event, as a tracker snippet would send it.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"site_id":"bench-load","event_type":"page_view","path":"/blog/2025/01/counting-visitors",' ..
           '"user_id":"u-7f3a9c2e51","timestamp":"2025-01-31T12:00:00Z"}'
