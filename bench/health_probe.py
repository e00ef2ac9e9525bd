"""Health Check latencies from a process of its own (so the load's client is not measured).

python bench/health_probe.py HOST:PORT      # probes every 10 ms until stdin closes,
                                            # then prints the latencies (ms) as JSON
"""

from __future__ import annotations

import json
import sys
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> None:
    address = sys.argv[1]
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    latencies: list[float] = []
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        stub.Check(health_pb2.HealthCheckRequest(), timeout=10)  # connected before "ready"
        print("ready", flush=True)
        while not stop.is_set():
            t0 = time.perf_counter()
            stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            latencies.append((time.perf_counter() - t0) * 1000)
            stop.wait(0.01)
    print(json.dumps(latencies), flush=True)


if __name__ == "__main__":
    main()
