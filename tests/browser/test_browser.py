"""The browser the page tests rely on is the distribution's chromium, and it records requests."""
from __future__ import annotations

import http.server
import threading

from conftest import free_ports


def test_chromium_loads_a_local_page_and_records_its_requests(new_page) -> None:
    port = free_ports(1)[0]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<!doctype html><title>probe</title><h1 id=h>local page</h1><img src='/pixel.png'>"
            self.send_response(200 if self.path == "/" else 404)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        recorded = new_page(width=360)
        recorded.page.goto(f"http://127.0.0.1:{port}/")
        assert recorded.page.inner_text("#h") == "local page"
        assert f"http://127.0.0.1:{port}/pixel.png" in recorded.requests
        assert recorded.outside_hosts() == []
        assert "HeadlessChrome" in recorded.page.evaluate("navigator.userAgent")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
