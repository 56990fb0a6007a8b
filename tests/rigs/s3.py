"""A real S3 server on loopback for the tests, and a proxy in front of it that injects
faults at the HTTP boundary.

The server is moto's (``moto[server]``): it speaks S3's HTTP protocol, so boto3 runs its
whole stack (signing, retries, ranged reads) against it; nothing on the client side is
stubbed. ``FaultProxy`` forwards every request to it unless told to answer 500/503,
sleep first, or cut a response body mid-way (a connection reset), for the next N
matching requests.
"""

from __future__ import annotations

import http.client
import re
import socket
import struct
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

S3_ENV = {  # moto accepts any credentials; boto3 needs some to sign
    "AWS_ACCESS_KEY_ID": "kvcdn-test",
    "AWS_SECRET_ACCESS_KEY": "kvcdn-test",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


class MotoS3:
    def __init__(self):
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="kvcdn-test", aws_secret_access_key="kvcdn-test")

    def new_bucket(self) -> str:
        name = f"kvcdn-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self._server.stop()


@dataclass
class Fault:
    kind: str  # "status" | "delay" | "reset"
    value: float  # the status code, the seconds, or the body bytes sent before the reset
    times: int  # requests left to fault
    method: str = ""  # only requests with this method ("" = any)
    path: str = ""  # only paths matching this regular expression


class FaultProxy:
    """An HTTP proxy to ``upstream`` on its own loopback port."""

    def __init__(self, upstream: str):
        self.upstream = upstream.removeprefix("http://")
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request seen
        self.client_ports: list[int] = []  # the client's port of each request: one per TCP connection
        self.faulted = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = proxy._take(self.command, self.path, self.client_address[1])
                if fault and fault.kind == "delay":
                    time.sleep(fault.value)
                if fault and fault.kind == "status":
                    return self._error(int(fault.value))
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding", "content-length", "server", "date"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if fault and fault.kind == "reset":
                    self.wfile.write(data[: int(fault.value)])
                    self.wfile.flush()
                    # RST, not FIN: the client sees "connection reset" mid-body.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _error(self, status: int):
                code = {503: "SlowDown", 500: "InternalError"}.get(status, "InternalError")
                xml = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                       f"<Message>injected by the test proxy</Message></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(xml)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(xml)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def inject(self, kind: str, value: float, times: int = 1, method: str = "", path: str = "") -> None:
        with self._lock:
            self.faults.append(Fault(kind, value, times, method, path))

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def _take(self, method: str, path: str, client_port: int) -> Fault | None:
        with self._lock:
            self.requests.append((method, path))
            self.client_ports.append(client_port)
            for fault in self.faults:
                if (not fault.method or fault.method == method) and re.search(fault.path, path):
                    fault.times -= 1
                    if fault.times <= 0:
                        self.faults.remove(fault)
                    self.faulted += 1
                    return fault
        return None

    def stop(self) -> None:
        self._server.shutdown()
