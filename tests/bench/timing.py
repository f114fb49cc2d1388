"""What the HTTP benches share: one request on a new connection, timed, and percentiles."""

from __future__ import annotations

import http.client
import time


def one_request(port: int, path: str, headers: dict[str, str]) -> float:
    """GET `path` on a new connection (as an agent's `curl` makes it); its latency in ms."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    start = time.perf_counter()
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    response.read()
    elapsed = time.perf_counter() - start
    conn.close()
    assert response.status == 200, (port, path, response.status)
    return elapsed * 1000


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]
