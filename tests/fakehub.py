"""A stand-in for the Hugging Face hub's file protocol, and for GitHub's release downloads, on
127.0.0.1, for tests.

It speaks what huggingface_hub's file downloads use, as huggingface.co does:
- HEAD/GET `/{owner}/{repo}/resolve/{revision}/{path}`, revision = a branch name or the commit;
- `X-Repo-Commit` on every answer; `ETag` = git blob sha1 for small files; for LFS files a 302 to
  a second origin (the "CDN", another port) with `X-Linked-Etag` = sha256 and `X-Linked-Size`;
- `Range: bytes=N-` answered with 206 and `Content-Range`;
- the hub's `X-Error-Code` on errors (RepoNotFound, RevisionNotFound, EntryNotFound).

And what a GitHub release asset's address does: GET `/{owner}/{repo}/releases/download/{tag}/{file}`
answers a 302 to the storage host (here the same second origin, `/assets/<sha256>`), which serves
the bytes with a strong ETag and honours `Range` (and `If-Range`); an unknown asset is a 404.

Faults on demand, each for a number of requests: close the connection after N body bytes (the
headers promise all of it), reset it (TCP RST) after N bytes, answer an HTTP status, serve damaged
bytes, or serve a file N bytes short whose headers agree with it. Every request is recorded with
its headers.

    with FakeHub() as hub:
        hub.add_repo("me/model", {"model.safetensors": data}, lfs={"model.safetensors"})
        os.environ["HF_ENDPOINT"] = hub.url
        url = hub.add_release("me/model", "v1", {"model.ckpt": data})["model.ckpt"]
"""

from __future__ import annotations

import hashlib
import re
import socket
import struct
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
    kind: str  # "drop" | "reset" | "status" | "corrupt" | "truncate"
    path_contains: str
    value: int  # bytes before the drop or reset, the HTTP status, or the bytes a truncated file lacks
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
        self.releases: dict[str, bytes] = {}  # "/{owner}/{repo}/releases/download/{tag}/{file}" -> bytes
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

    def add_release(self, repo_id: str, tag: str, files: dict[str, bytes]) -> dict[str, str]:
        """Release assets; returns each file's download address."""
        urls = {}
        for name, data in files.items():
            path = f"/{repo_id}/releases/download/{tag}/{name}"
            self.releases[path] = data
            urls[name] = self.url + path
        return urls

    @staticmethod
    def asset_path(data: bytes) -> str:
        """Where the storage host serves a release asset (what a fault on its bytes names)."""
        return "/assets/" + hashlib.sha256(data).hexdigest()

    # --- faults and what happened ----------------------------------------------------------------

    def drop_after(self, path_contains: str, nbytes: int, times: int = 1) -> None:
        """Close the connection after sending `nbytes` of the body (headers promise all of it)."""
        self.faults.append(Fault("drop", path_contains, nbytes, times))

    def fail(self, path_contains: str, status: int, times: int = 1000, methods=("GET",)) -> None:
        self.faults.append(Fault("status", path_contains, status, times, tuple(methods)))

    def corrupt(self, path_contains: str, times: int = 1) -> None:
        """Serve the right number of bytes, with one of them changed."""
        self.faults.append(Fault("corrupt", path_contains, 0, times))

    def reset_after(self, path_contains: str, nbytes: int, times: int = 1) -> None:
        """Reset the connection (TCP RST) after sending `nbytes` of the body."""
        self.faults.append(Fault("reset", path_contains, nbytes, times))

    def truncate(self, path_contains: str, missing: int, times: int = 1) -> None:
        """Serve the file without its last `missing` bytes, headers and all: a shorter file."""
        self.faults.append(Fault("truncate", path_contains, missing, times))

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
            if "/releases/download/" in path:
                return self._serve_release(path)
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

        def _serve_release(self, path: str) -> None:
            data = hub.releases.get(unquote(path))
            if data is None:
                return self._reply(404)
            self._reply(302, headers={"Location": hub._origin("cdn") + hub.asset_path(data)})

        def _serve_blob(self, path: str, body: bool, fault: Fault | None) -> None:
            sha256 = path.rsplit("/", 1)[-1]
            if path.startswith("/assets/"):
                for data in hub.releases.values():
                    if hashlib.sha256(data).hexdigest() == sha256:
                        return self._send_content(data, body, fault, {"ETag": f'"{sha256[:16]}"'})
                return self._reply(404)
            for repo in hub.repos.values():
                for name, data in repo.files.items():
                    if name in repo.lfs and hashlib.sha256(data).hexdigest() == sha256:
                        return self._send_content(data, body, fault, {"ETag": f'"{sha256}"'})
            self._reply(404)

        # --- responses ---------------------------------------------------------------------------

        def _send_content(self, data: bytes, body: bool, fault: Fault | None, headers: dict) -> None:
            if fault is not None and fault.kind == "truncate":
                data = data[: len(data) - fault.value]
            start = 0
            rng = self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            if rng and if_range is not None and if_range != headers.get("ETag"):
                rng = None  # the file changed since: all of it, from the start
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
            if fault is not None and fault.kind in ("drop", "reset"):
                self.wfile.write(chunk[: fault.value])
                self.wfile.flush()
                self.close_connection = True
                try:
                    if fault.kind == "reset":  # linger 0: close() sends RST, not FIN
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        self.connection.close()
                    else:
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
