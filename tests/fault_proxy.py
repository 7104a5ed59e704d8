"""A fault-injecting HTTP proxy for the storage tests: listens on 127.0.0.1 and forwards every
request to the Cloud Storage emulator on 127.0.0.1, except while a fault is set, when requests
whose path matches get a 503 or 429 answer, a reset connection, or a stall before forwarding.
Point the storage clients at it instead of the emulator (STORAGE_EMULATOR_HOST=proxy.url ...).

Faults are armed by `fail` and each starts at the first request that matches it; from then on,
for its window, it hits every request, whichever client sent it (an outage hits everyone). So that
a test can tell which clients met a fault, the proxy records each request a fault hit: its client
(named from its User-Agent, see CLIENTS), method and path (`met_by`). The proxy only ever talks to
localhost, every loop in it is bounded, and it stops by itself after `lifetime_secs` even if
nobody stops it.
"""
from __future__ import annotations

import http.client
import http.server
import re
import socket
import struct
import sys
import threading
import time
import urllib.parse

# The User-Agent each storage client of a run sends (seen by logging the header through this proxy),
# by prefix: gcsfs (etils.epath's gs:// backend, so Orbax's own metadata files and storage.py),
# tensorstore (Orbax's array writes and reads), google-cloud-cpp (array_record's reader, statically
# linked into array_record; nothing else in the run uses it) and google-cloud-storage.
CLIENTS = {"python-gcsfs/": "gcsfs", "tensorstore/": "tensorstore", "gl-cpp/": "array_record",
           "gcloud-python/": "google-cloud-storage"}
# Requests recorded per fault (the count goes on past it).
_MAX_HITS = 500

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
               "proxy-authenticate", "content-length"}


class FaultProxy:
    def __init__(self, upstream: str, lifetime_secs: float = 900.0):
        target = urllib.parse.urlsplit(upstream)
        if target.hostname != "127.0.0.1":
            raise ValueError(f"{upstream}: the proxy forwards to 127.0.0.1 only")
        self.upstream = (target.hostname, target.port)
        self._lock = threading.Lock()
        self._faults: list[dict] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy._fault_for(self.command, self.path, body, self.headers.get("User-Agent", ""))
                kind = fault and fault["kind"]
                if kind in ("503", "429"):
                    message = b'{"error": {"code": %s, "message": "injected"}}' % kind.encode()
                    self.send_response(int(kind))
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(message)))
                    self.end_headers()
                    self.wfile.write(message)
                    return
                if kind == "reset":  # RST instead of an answer
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                if kind == "stall":
                    time.sleep(fault["stall_secs"])
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                    headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    answer = conn.getresponse()
                    data = answer.read()
                finally:
                    conn.close()
                self.send_response(answer.status, answer.reason)
                for k, v in answer.getheaders():
                    if k.lower() not in _HOP_BY_HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                # A client that gave up on a stalled or reset request closes its end: expected here.
                if not isinstance(sys.exc_info()[1], ConnectionError):
                    super().handle_error(request, client_address)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        self._timer = threading.Timer(lifetime_secs, self.close)
        self._timer.daemon = True
        self._timer.start()

    def fail(self, kind: str, secs: float, match: str = "", stall_secs: float = 0.0, client: str = "") -> None:
        """Adds a fault: from the first request that matches the regex `match` on, for `secs`
        seconds, every request meets `kind`: "503", "429", "reset" or "stall" (stall_secs, then
        forwarded). A request is matched on "METHOD PATH BODY" (path unquoted, the body's first
        2 kB: an upload names its object in the path or in its metadata part); with `client` (a
        name in CLIENTS), only a request of that client starts the fault, which then hits every
        client's requests as before. Faults are tried in the order armed and a request meets one
        at most, so faults with the same match follow one another."""
        if client and client not in CLIENTS.values():
            raise ValueError(f"client {client!r}: one of {sorted(CLIENTS.values())}")
        with self._lock:
            self._faults.append({"kind": kind, "secs": secs, "match": re.compile(match), "until": None,
                                 "stall_secs": stall_secs, "client": client, "met": 0, "hits": []})

    def _fault_for(self, method: str, path: str, body: bytes, user_agent: str) -> dict | None:
        seen = f"{method} {urllib.parse.unquote(path)} {body[:2048].decode('latin-1')}"
        client = client_of(user_agent)
        now = time.monotonic()
        with self._lock:
            for fault in self._faults:
                if fault["until"] is None and fault["client"] in ("", client) and fault["match"].search(seen):
                    fault["until"] = now + fault["secs"]
                if fault["until"] is not None and now < fault["until"]:
                    fault["met"] += 1
                    if len(fault["hits"]) < _MAX_HITS:
                        fault["hits"].append((client, method, urllib.parse.unquote(path)))
                    return fault
        return None

    def met(self) -> list[tuple[str, str, int]]:
        """(kind, match, how many requests met it) of every fault armed."""
        with self._lock:
            return [(f["kind"], f["match"].pattern, f["met"]) for f in self._faults]

    def met_by(self) -> list[tuple[str, str, list[tuple[str, str, str]]]]:
        """(kind, match, requests) of every fault armed, requests being (client, method, path) of
        each request it hit (the first 500), client as `client_of` names it."""
        with self._lock:
            return [(f["kind"], f["match"].pattern, list(f["hits"])) for f in self._faults]

    def close(self) -> None:
        self._timer.cancel()
        self.server.shutdown()
        self.server.server_close()


def client_of(user_agent: str) -> str:
    """The storage client a User-Agent names (CLIENTS), or the User-Agent itself if none."""
    return next((name for prefix, name in CLIENTS.items() if user_agent.startswith(prefix)), user_agent or "-")
