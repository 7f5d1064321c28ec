"""Memory and answers of ``moodstream serve`` under concurrent uploads of real audio.

    python -m bench.uploads [AUDIO_FILE] [--concurrent 50] [--rounds 3] [--out FILE]

Starts the service as a user would (``python -m pipeline serve``, in-process onnxruntime, a
fresh SQLite catalog, no Kafka), then:

1. one upload alone: its answer time and the peak memory it took;
2. ``--rounds`` times, ``--concurrent`` uploads at once of the same file: how many got the
   record (200), how many were turned away (503 with ``Retry-After``), anything else; every
   second round the clients retry after ``Retry-After`` until each has its record;
3. throughout, the resident memory (RSS, /proc) of the service and its decoding processes
   together, sampled every 50 ms: the peak per round, and whether the service is still alive.

Memory is bounded when the peak does not grow with the number of uploads: the in-flight bound
(``MOODSTREAM_MAX_ANALYSES_IN_FLIGHT``) admits a fixed number of analyses, the rest are answered
at once, and an admitted upload is spooled to a temporary file as it arrives (the decoding
process reads it from there). Prints a Markdown table and writes
JSON. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp

from bench import REPO_ROOT
from devstack import free_ports

DEFAULT_CLIP = Path.home() / ".cache" / "moodstream" / "clips" / "drascula-track1-100s.ogg"
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants, in bytes (0 once it is gone)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            total += int((Path("/proc") / str(current) / "statm").read_text().split()[1]) * PAGE_SIZE
        except (OSError, IndexError, ValueError):
            continue
        todo.extend(children.get(current, []))
    return total


class PeakSampler:
    """Samples :func:`tree_rss_bytes` every ``period_s`` in the background; ``peak`` in bytes."""

    def __init__(self, pid: int, period_s: float = 0.05) -> None:
        self.pid, self.period_s, self.peak = pid, period_s, 0
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> PeakSampler:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, await asyncio.to_thread(tree_rss_bytes, self.pid))
            await asyncio.sleep(self.period_s)


def start_service(port: int, folder: Path, in_flight: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "MOODSTREAM_SCORER": "onnx",
        "MOODSTREAM_SERVICE_HOST": "127.0.0.1",
        "MOODSTREAM_SERVICE_PORT": str(port),
        "MOODSTREAM_CATALOG_URL": f"sqlite:///{folder / 'catalog.db'}",
        "MOODSTREAM_INDEX_DIR": str(folder / "index"),
        "MOODSTREAM_CATALOG_FOLLOW": "false",
        "MOODSTREAM_MAX_ANALYSES_IN_FLIGHT": str(in_flight),
    }
    log = open(folder / "service.log", "wb")
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve"], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )


async def wait_ready(
    client: aiohttp.ClientSession, base: str, service: subprocess.Popen, timeout_s: float = 180.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.poll() is not None:
            raise SystemExit(f"the service exited with status {service.returncode}")
        try:
            async with client.get(base + "/readyz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.5)
    raise SystemExit("the service did not become ready")


async def upload(
    client: aiohttp.ClientSession, base: str, data: bytes, name: str, *, retry: bool = False
) -> tuple[int, float]:
    """(final status, seconds until it); with ``retry``, a 503 is retried after its Retry-After."""
    start = time.perf_counter()
    while True:
        form = aiohttp.FormData()
        form.add_field("file", data, filename=name, content_type="application/octet-stream")
        async with client.post(base + "/v1/analyses", data=form) as response:
            await response.read()
            status, retry_after = response.status, response.headers.get("retry-after")
        if status != 503:
            break
        assert retry_after is not None, "a 503 without Retry-After"
        if not retry:
            break
        await asyncio.sleep(float(retry_after))
    return status, time.perf_counter() - start


async def measure(clip: Path, concurrent: int, rounds: int, in_flight: int) -> dict:
    data = clip.read_bytes()
    with tempfile.TemporaryDirectory(prefix="moodstream-uploads-") as tmp:
        port = free_ports(1)[0]
        service = start_service(port, Path(tmp), in_flight)
        try:
            base = f"http://127.0.0.1:{port}"
            timeout = aiohttp.ClientTimeout(total=600)
            async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as client:
                await wait_ready(client, base, service)
                idle = tree_rss_bytes(service.pid)
                async with PeakSampler(service.pid) as single:
                    status, seconds = await upload(client, base, data, clip.name)
                assert status == 200, f"a single upload got {status}"
                result = {
                    "idle_rss_mb": idle / 2**20,
                    "single": {"seconds": seconds, "peak_rss_mb": single.peak / 2**20},
                    "rounds": [],
                }
                # Odd rounds: every client takes its first answer; even rounds: clients retry a
                # 503 after its Retry-After, so all of them are analysed in the end.
                for number in range(rounds):
                    retry = number % 2 == 1
                    async with PeakSampler(service.pid) as sampler:
                        start = time.perf_counter()
                        answers = await asyncio.gather(
                            *(upload(client, base, data, f"{i}-{clip.name}", retry=retry) for i in range(concurrent))
                        )
                        wall = time.perf_counter() - start
                    codes = Counter(code for code, _ in answers)
                    result["rounds"].append(
                        {
                            "retry": retry,
                            "wall_s": wall,
                            "peak_rss_mb": sampler.peak / 2**20,
                            "status": dict(sorted(codes.items())),
                            "alive": service.poll() is None,
                        }
                    )
                async with client.get(base + "/healthz") as health:
                    result["alive_after"] = service.poll() is None and health.status == 200
                return result
        finally:
            service.terminate()
            service.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("audio_file", nargs="?", type=Path, default=DEFAULT_CLIP)
    parser.add_argument("--concurrent", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--in-flight", type=int, default=4, help="MOODSTREAM_MAX_ANALYSES_IN_FLIGHT of the service")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "uploads.json")
    args = parser.parse_args()
    if not args.audio_file.is_file():
        raise SystemExit(f"no file {args.audio_file}; `make clips` writes the default one")
    result = asyncio.run(measure(args.audio_file, args.concurrent, args.rounds, args.in_flight))
    result.update(
        file=args.audio_file.name,
        bytes=args.audio_file.stat().st_size,
        concurrent=args.concurrent,
        in_flight=args.in_flight,
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
        date=time.strftime("%Y-%m-%d"),
    )
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"idle {result['idle_rss_mb']:.0f} MB; one upload alone: {result['single']['seconds']:.1f} s, peak {result['single']['peak_rss_mb']:.0f} MB\n"
    )
    print(
        f"| round | clients | {args.concurrent} uploads at once: answers | wall s | peak RSS MB | alive |\n|---|---|---|---|---|---|"
    )
    for i, r in enumerate(result["rounds"], 1):
        answers = ", ".join(f"{n}× {code}" for code, n in r["status"].items())
        print(
            f"| {i} | {'retry 503' if r['retry'] else 'first answer'} | {answers} | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['alive']} |"
        )
    print(f"\nalive after: {result['alive_after']}")


if __name__ == "__main__":
    main()
