"""A loopback HTTP proxy in front of a real S3 server that misbehaves the way broken gateways do.

It forwards every request to the upstream server and can
- drop request headers (`drop_headers`): e.g. `If-None-Match` / `If-Match`, like S3-compatible gateways
  that ignore conditional writes. SigV4 signs those headers, so such a proxy also strips the signature
  (`anonymous=True`) and needs an upstream that accepts anonymous writes (`SeaweedS3(anonymous=True)`);
- cut the next GET response bodies after some bytes and close the connection, like a connection
  reset in the middle of a download (the headers announce the full length);
- answer the next requests with 503 SlowDown, before the server sees them or after it has acted on
  them (an answer lost on the way back);
- check `If-None-Match: *` itself, with a HEAD and then an unconditional PUT (`racy_creates`): right for one
  writer at a time, wrong under a concurrent burst, like gateways whose conditional create is not atomic
  (reported for SeaweedFS, seaweedfs issue 8800, and rustfs, issue 1659);
- refuse requests that carry conditional headers with 501 NotImplemented (`refuse_conditions`).
"""
from __future__ import annotations

import http.client
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SIGNATURE_HEADERS = ("authorization", "x-amz-date", "x-amz-content-sha256", "x-amz-security-token")
HOP_BY_HOP = ("connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade")


class S3Proxy:
    def __init__(self, upstream: str, *, drop_headers: tuple[str, ...] = (), anonymous: bool = False,
                 racy_creates: bool = False, refuse_conditions: bool = False) -> None:
        parts = urlsplit(upstream)
        self.racy_creates, self.refuse_conditions = racy_creates, refuse_conditions
        self.upstream = (parts.hostname, parts.port)
        self.drop = {h.lower() for h in drop_headers} | (set(SIGNATURE_HEADERS) if anonymous else set())
        self.cut_reads = 0
        self.cut_at = 0
        self.failures = 0
        self.fail_after_forwarding = False
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="s3proxy")

    def cut_next_reads(self, count: int, after_bytes: int) -> None:
        """Cut the bodies of the next `count` GET responses after `after_bytes` bytes."""
        with self.lock:
            self.cut_reads, self.cut_at = count, after_bytes

    def fail_next(self, count: int, after_forwarding: bool = False) -> None:
        """Answer the next `count` requests with 503 SlowDown; `after_forwarding`: once the server has acted."""
        with self.lock:
            self.failures, self.fail_after_forwarding = count, after_forwarding

    def _take_failure(self) -> tuple[bool, bool]:
        """(fail this request, after forwarding it)."""
        with self.lock:
            if self.failures <= 0:
                return False, False
            self.failures -= 1
            return True, self.fail_after_forwarding

    def _take_cut(self) -> int | None:
        with self.lock:
            if self.cut_reads <= 0:
                return None
            self.cut_reads -= 1
            return self.cut_at

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def slow_down(self) -> None:
                body = b"<Error><Code>SlowDown</Code><Message>injected by the test proxy</Message></Error>"
                self.send_response_only(503, "Slow Down")
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body if self.command != "HEAD" else b"")

            def error(self, status: int, code: str) -> None:
                body = f"<Error><Code>{code}</Code><Message>injected by the test proxy</Message></Error>".encode()
                self.send_response_only(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body if self.command != "HEAD" else b"")

            def forward(self) -> None:
                body = self.read_body()
                fail, after_forwarding = proxy._take_failure()
                if fail and not after_forwarding:
                    return self.slow_down()
                conditional = {"if-none-match", "if-match"} & {k.lower() for k in self.headers}
                if proxy.refuse_conditions and conditional:
                    return self.error(501, "NotImplemented")
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in proxy.drop and k.lower() not in HOP_BY_HOP}
                if proxy.racy_creates and self.command == "PUT" and "if-none-match" in conditional:
                    headers = {k: v for k, v in headers.items() if k.lower() != "if-none-match"}
                    check = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                    check.request("HEAD", self.path)
                    exists = check.getresponse().status == 200
                    check.close()
                    if exists:
                        return self.error(412, "PreconditionFailed")
                    time.sleep(0.05)   # the gap between the check and the write that concurrent writers share
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                    if fail:
                        return self.slow_down()
                    self.send_response_only(response.status, response.reason)
                    for k, v in response.getheaders():
                        if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                            self.send_header(k, v)
                    length = response.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                    self.send_header("Content-Length", length or "0")
                    self.end_headers()
                    cut = proxy._take_cut() if self.command == "GET" and len(data) > proxy.cut_at else None
                    if cut is None:
                        self.wfile.write(data)
                        return
                    self.wfile.write(data[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                finally:
                    upstream.close()

            def read_body(self) -> bytes | None:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else None

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = forward

        return Handler

    def start(self) -> S3Proxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> S3Proxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
