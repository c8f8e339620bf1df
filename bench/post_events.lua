-- 100 events (~15 KB) per POST /events as one JSON array.
local events = {}
for i = 1, 100 do
  events[i] = string.format(
    '{"site_id":"bench-load","event_type":"page_view","path":"/docs/page-%03d",' ..
    '"user_id":"u-%08d","timestamp":"2025-01-31T12:%02d:%02d.%03dZ"}',
    i, i * 7919, i % 60, (i * 13) % 60, i)
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = "[" .. table.concat(events, ",") .. "]"
