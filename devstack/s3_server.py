"""The embedded stack's S3 server: moto, optionally durable across restarts and with injected
errors and latency.

moto keeps everything in memory, so a restarted moto has lost every object: a worker would then
dead-letter good tracks as ``not_found``, which no real S3 outage does. With ``--journal FILE``
every successful write (PUT, POST, DELETE) is appended to the journal before it is answered, and
a restarted server replays the journal into its backend before it listens: a restart then looks
to clients as a real one does, an outage with the data still there. (Multipart uploads are
journaled step by step and would not replay, their upload ids being new; nothing here uses
them.)

With ``--faults`` the server also answers ``/_moodstream/faults`` (POST a JSON list of rules,
GET them back): a rule ``{"match": "clips/", "status": 503, "code": "SlowDown", "every": 3}``
answers that error instead of every third request whose path contains ``match``; ``delay_s``
holds the matching requests that long first. Rules live in the process: a restart clears them.

    python -m devstack.s3_server PORT [--journal FILE] [--faults]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

_WRITES = frozenset({"PUT", "POST", "DELETE"})
_FAULTS_PATH = "/_moodstream/faults"
#: request headers not replayed: they describe the connection, not the request
_DROPPED_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class Journal:
    """Append-only log of the writes the server acknowledged, one JSON object a line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file = open(path, "a", encoding="utf-8")  # open for the process's life

    def append(self, method: str, path: str, query: str, headers: dict[str, str], body: bytes) -> None:
        entry = {"m": method, "p": path, "q": query, "h": headers, "b": base64.b64encode(body).decode()}
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        with self._lock:
            self._file.write(line)
            # A killed process loses what is still in its own buffer, not what the kernel holds.
            self._file.flush()

    def replay(self, app: WSGIApp) -> int:
        """Apply every journaled write to ``app`` in order; how many."""
        from werkzeug.test import Client

        client = Client(app)
        count = 0
        if not self.path.exists():
            return 0
        with open(self.path, encoding="utf-8") as lines:
            for line in lines:
                if not line.endswith("\n"):
                    break  # a write cut short by a kill was never acknowledged
                entry = json.loads(line)
                client.open(
                    entry["p"],
                    method=entry["m"],
                    query_string=entry["q"],
                    headers=entry["h"],
                    data=base64.b64decode(entry["b"]),
                )
                count += 1
        return count


class Faults:
    """Injected errors and latency, by path."""

    def __init__(self) -> None:
        self.rules: list[dict[str, Any]] = []
        self.hits: dict[int, int] = {}
        self._lock = threading.Lock()

    def match(self, path: str) -> dict[str, Any] | None:
        with self._lock:
            for i, rule in enumerate(self.rules):
                if rule.get("match", "") in path:
                    self.hits[i] = self.hits.get(i, 0) + 1
                    if self.hits[i] % max(1, int(rule.get("every", 1))) == 0:
                        return rule
        return None

    def set(self, rules: list[dict[str, Any]]) -> None:
        with self._lock:
            self.rules = list(rules)
            self.hits = {}


def durable_app(app: WSGIApp, journal: Journal | None, faults: Faults | None) -> WSGIApp:
    """``app`` (moto) with its acknowledged writes journaled and the injected faults applied."""

    def wrapped(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if faults is not None and path == _FAULTS_PATH:
            return _faults_endpoint(environ, start_response, faults)
        rule = faults.match(path) if faults is not None else None
        if rule is not None:
            if rule.get("delay_s"):
                time.sleep(float(rule["delay_s"]))
            if rule.get("status"):
                return _error(start_response, int(rule["status"]), str(rule.get("code", "InternalError")))
        method = environ.get("REQUEST_METHOD", "GET")
        if journal is None or method not in _WRITES:
            return app(environ, start_response)
        body = _body(environ)
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))

        def record(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if status[:1] == "2":
                kept = {
                    k[5:].replace("_", "-").lower(): v
                    for k, v in environ.items()
                    if k.startswith("HTTP_") and k[5:].replace("_", "-").lower() not in _DROPPED_HEADERS
                }
                if environ.get("CONTENT_TYPE"):
                    kept["content-type"] = environ["CONTENT_TYPE"]
                journal.append(method, path, environ.get("QUERY_STRING", ""), kept, body)
            return start_response(status, headers, exc_info)

        return app(environ, record)

    return wrapped


def _body(environ: dict[str, Any]) -> bytes:
    """The request's whole body (a chunked one has no length: read to its end)."""
    length = environ.get("CONTENT_LENGTH")
    if length:
        return environ["wsgi.input"].read(int(length))
    if environ.get("wsgi.input_terminated"):
        return environ["wsgi.input"].read()
    return b""


def _faults_endpoint(environ: dict[str, Any], start_response: StartResponse, faults: Faults) -> Iterable[bytes]:
    if environ.get("REQUEST_METHOD") == "POST":
        faults.set(json.loads(_body(environ) or b"[]"))
    body = json.dumps(faults.rules).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def _error(start_response: StartResponse, status: int, code: str) -> Iterable[bytes]:
    xml = (
        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
        "<Message>injected by the embedded stack</Message></Error>"
    ).encode()
    reason = {500: "Internal Server Error", 503: "Slow Down"}.get(status, "Error")
    start_response(f"{status} {reason}", [("Content-Type", "application/xml"), ("Content-Length", str(len(xml)))])
    return [xml]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m devstack.s3_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--journal", type=Path, help="keep acknowledged writes here and replay them at start")
    parser.add_argument("--faults", action="store_true", help=f"inject errors and latency ({_FAULTS_PATH})")
    args = parser.parse_args(argv)

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    moto = DomainDispatcherApplication(create_backend_app)
    journal = Journal(args.journal) if args.journal else None
    started = time.monotonic()
    replayed = journal.replay(moto) if journal else 0
    app = durable_app(moto, journal, Faults() if args.faults else None)
    server = make_server("127.0.0.1", args.port, app, threaded=True, request_handler=MotoRequestHandler)
    print(
        f"s3 (moto) on 127.0.0.1:{args.port}; {replayed} journaled writes replayed in "
        f"{time.monotonic() - started:.1f} s (pid {os.getpid()})",
        flush=True,
    )
    server.serve_forever()


if __name__ == "__main__":
    main()
