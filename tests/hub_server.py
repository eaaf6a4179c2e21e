"""A local HTTP server that answers as the Hugging Face hub does for a gated or a missing repository (the hub client
maps the ``X-Error-Code`` header onto its errors), so the bundle's messages are tested without the network."""

from __future__ import annotations

import contextlib
import http.server
import threading
from typing import Iterator


@contextlib.contextmanager
def fake_hub(gated: tuple[str, ...] = ("MahmoodLab/UNI",)) -> Iterator[str]:
    """``http://127.0.0.1:<port>``: repositories in ``gated`` answer 403 GatedRepo, every other one 404 RepoNotFound."""

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            hit = any(f"/{repo}/" in self.path for repo in gated)
            self.send_response(403 if hit else 404)
            self.send_header("X-Error-Code", "GatedRepo" if hit else "RepoNotFound")
            self.send_header("X-Error-Message", "Access to model is restricted" if hit else "Repository not found")
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
