"""A local stand-in for a hosted reranker: Cohere's POST /v1/rerank (or /v2/rerank) on 127.0.0.1, scoring
a document by the words it shares with the query; a query containing FAIL gets a 500 (a provider error)."""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (the http.server API)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        if self.path not in ("/v1/rerank", "/v2/rerank", "/rerank") or "FAIL" in body["query"]:
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b'{"message": "internal error"}')
            return
        words = set(body["query"].lower().split())
        scores = [len(words & set(doc.lower().split())) / 10 for doc in body["documents"]]
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[: body.get("top_n") or len(scores)]
        answer = {"id": "stub", "results": [{"index": i, "relevance_score": scores[i]} for i in order],
                  "meta": {"billed_units": {"search_units": 1}}}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # quiet
        pass


@contextmanager
def rerank_server():
    """Yields (api_base, requests received)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.requests
    finally:
        server.shutdown()
        server.server_close()
