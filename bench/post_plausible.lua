-- One pageview per POST /api/event, as the official Plausible trackers send it.
wrk.method = "POST"
wrk.headers["Content-Type"] = "text/plain"
wrk.headers["User-Agent"] = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 " ..
                            "(KHTML, like Gecko) Chrome/156.0.0.0 Safari/537.36"
wrk.body = '{"n":"pageview","v":36,"u":"https://example.com/blog/2025/01/counting-visitors",' ..
           '"d":"example.com","r":"https://news.example.org/"}'
