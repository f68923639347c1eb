"""Shared helpers of the fault, fuzz and load harness (tests/test_faults_*.py,
tests/test_fuzz_*.py, tests/test_load_*.py and benchmarks/faults.py).

- `server`: the real server as a subprocess on a data dir, with the marker runner
  configured; kill -9, restart, RSS sampling.
- `marker_runner.py`: the `command` runner script that records attempt start/stop markers.
- `markers`: reading those markers and finding overlapping attempts of one run.
- `crash`: the crash-under-load harness (submits, cancels, SSE readers, kill -9, checks).
- `storage`: a tiny tmpfs for the data dir (full-disk faults).
- `corruption`: damaging copies of a real journal and judging what start-up does.
- `sse`: a minimal SSE client over raw trio sockets (for 1,000 subscribers at once).
- `rawhttp`: HTTP/1.1 over a plain socket for requests httpx refuses to send, and a cheap
  keep-alive client for high-rate loops.
- `load`: the load scenarios (1,000 subscribers, never-reading clients, a deep queue,
  the soak).

Everything talks to 127.0.0.1 only, and every loop is bounded in count and time.
"""
