import http.server
import os
import threading

import pytest


@pytest.fixture(autouse=True)
def _isolated(isolated_data):
    pass


@pytest.fixture
def image_server(photo):
    """A local HTTP server with a photo, a redirect to it, a redirect to a private address, and HTML."""
    routes = {
        "/cat.jpg": (200, {"Content-Type": "image/jpeg"}, photo("chelsea")),
        "/moved": (302, {"Location": "/cat.jpg"}, b""),
        "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
        "/page.html": (200, {"Content-Type": "image/jpeg"}, b"<html><body>not an image</body></html>"),
        "/big.jpg": (200, {"Content-Type": "image/jpeg"}, os.urandom(300_000)),
    }

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            status, headers, body = routes.get(self.path, (404, {}, b"missing"))
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
