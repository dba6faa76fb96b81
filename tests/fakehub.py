"""A stand-in for the Hugging Face hub's file protocol, on 127.0.0.1, for tests.

It speaks what huggingface_hub's file downloads use, as huggingface.co does:
- HEAD/GET `/{owner}/{repo}/resolve/{revision}/{path}`, revision = a branch name or the commit;
- `X-Repo-Commit` on every answer; `ETag` = git blob sha1 for small files; for LFS files a 302 to
  a second origin (the "CDN", another port) with `X-Linked-Etag` = sha256 and `X-Linked-Size`;
- `Range: bytes=N-` answered with 206 and `Content-Range`;
- the hub's `X-Error-Code` on errors (RepoNotFound, RevisionNotFound, EntryNotFound).

Faults on demand, each for a number of requests: drop the connection after N body bytes, answer an
HTTP status, or serve damaged bytes. Every request is recorded with its headers.

    with FakeHub() as hub:
        hub.add_repo("me/model", {"model.safetensors": data}, lfs={"model.safetensors"})
        os.environ["HF_ENDPOINT"] = hub.url
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

REQUEST_TIMEOUT = 10  # seconds a connection may sit idle before its handler thread gives up


@dataclass
class Request:
    server: str  # "hub" or "cdn"
    method: str
    path: str
    headers: dict[str, str]  # names in lower case


@dataclass
class Fault:
    kind: str  # "drop" | "status" | "corrupt"
    path_contains: str
    value: int  # bytes before the drop, or the HTTP status
    times: int  # requests it still applies to
    methods: tuple[str, ...] = ("GET",)


@dataclass
class Repo:
    commit: str
    files: dict[str, bytes]
    lfs: set[str] = field(default_factory=set)


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.faults: list[Fault] = []
        self._lock = threading.Lock()
        self._servers: dict[str, ThreadingHTTPServer] = {}
        self._threads: list[threading.Thread] = []
        self._connections: set[socket.socket] = set()

    # --- content ---------------------------------------------------------------------------------

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, commit: str | None = None,
                 lfs: set[str] | frozenset[str] = frozenset()) -> Repo:
        commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()
        self.repos[repo_id] = Repo(commit, dict(files), set(lfs))
        return self.repos[repo_id]

    # --- faults and what happened ----------------------------------------------------------------

    def drop_after(self, path_contains: str, nbytes: int, times: int = 1) -> None:
        """Close the connection after sending `nbytes` of the body (headers promise all of it)."""
        self.faults.append(Fault("drop", path_contains, nbytes, times))

    def fail(self, path_contains: str, status: int, times: int = 1000, methods=("GET",)) -> None:
        self.faults.append(Fault("status", path_contains, status, times, tuple(methods)))

    def corrupt(self, path_contains: str, times: int = 1) -> None:
        """Serve the right number of bytes, with one of them changed."""
        self.faults.append(Fault("corrupt", path_contains, 0, times))

    def clear_faults(self) -> None:
        self.faults.clear()

    def seen(self, method: str | None = None, path_contains: str = "", server: str | None = None) -> list[Request]:
        return [r for r in self.requests if (method is None or r.method == method)
                and path_contains in r.path and (server is None or r.server == server)]

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.times > 0 and method in fault.methods and fault.path_contains in path:
                    fault.times -= 1
                    return fault
        return None

    # --- life cycle ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self._origin("hub")

    def _origin(self, name: str) -> str:
        host, port = self._servers[name].server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        for name in ("hub", "cdn"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, name))
            server.daemon_threads = True
            self._servers[name] = server
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                      name=f"fakehub-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection (pooled keep-alive ones included)."""
        for server in self._servers.values():
            server.shutdown()
            server.server_close()
        with self._lock:
            for conn in list(self._connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _handler(hub: FakeHub, server_name: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's client expects
        timeout = REQUEST_TIMEOUT

        def setup(self):
            super().setup()
            with hub._lock:
                hub._connections.add(self.connection)

        def finish(self):
            with hub._lock:
                hub._connections.discard(self.connection)
            super().finish()

        def log_message(self, *args):  # quiet
            pass

        def do_HEAD(self):
            self._serve(body=False)

        def do_GET(self):
            self._serve(body=True)

        # --- routing -----------------------------------------------------------------------------

        def _serve(self, body: bool) -> None:
            path = urlsplit(self.path).path
            hub.requests.append(Request(server_name, self.command, path,
                                        {k.lower(): v for k, v in self.headers.items()}))
            fault = hub._take_fault(self.command, path)
            if fault is not None and fault.kind == "status":
                return self._reply(fault.value, headers={"X-Error-Code": "ServerError"})
            if server_name == "cdn":
                return self._serve_blob(path, body, fault)
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if not m:
                return self._reply(404, headers={"X-Error-Code": "RepoNotFound"})
            repo_id, revision, filename = unquote(m[1]), unquote(m[2]), unquote(m[3])
            repo = hub.repos.get(repo_id)
            if repo is None:  # the hub answers 401 for unknown (or private) repos
                return self._reply(401, headers={"X-Error-Code": "RepoNotFound"})
            if revision not in (repo.commit, "main"):
                return self._reply(404, headers={"X-Error-Code": "RevisionNotFound"})
            if filename not in repo.files:
                return self._reply(404, headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.commit})
            data = repo.files[filename]
            common = {"X-Repo-Commit": repo.commit}
            if filename in repo.lfs:
                sha256 = hashlib.sha256(data).hexdigest()
                return self._reply(302, headers={
                    **common, "ETag": f'"{sha256}"', "X-Linked-Etag": f'"{sha256}"',
                    "X-Linked-Size": str(len(data)),
                    "Location": f"{hub._origin('cdn')}/blobs/{sha256}",
                })
            self._send_content(data, body, fault, {**common, "ETag": f'"{git_blob_sha1(data)}"'})

        def _serve_blob(self, path: str, body: bool, fault: Fault | None) -> None:
            sha256 = path.rsplit("/", 1)[-1]
            for repo in hub.repos.values():
                for name, data in repo.files.items():
                    if name in repo.lfs and hashlib.sha256(data).hexdigest() == sha256:
                        return self._send_content(data, body, fault, {"ETag": f'"{sha256}"'})
            self._reply(404)

        # --- responses ---------------------------------------------------------------------------

        def _send_content(self, data: bytes, body: bool, fault: Fault | None, headers: dict) -> None:
            start = 0
            rng = self.headers.get("Range")
            if rng:
                m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
                start = int(m[1]) if m else 0
                if start >= len(data):
                    return self._reply(416, headers={"Content-Range": f"bytes */{len(data)}"})
            chunk = data[start:]
            if fault is not None and fault.kind == "corrupt" and chunk:
                chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
            self.send_response(206 if rng else 200)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(chunk)))
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if not body:
                return
            if fault is not None and fault.kind == "drop":
                self.wfile.write(chunk[: fault.value])
                self.wfile.flush()
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            self.wfile.write(chunk)

        def _reply(self, status: int, headers: dict | None = None) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler
