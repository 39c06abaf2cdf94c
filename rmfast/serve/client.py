"""What a program that starts rmfast-serve itself needs (the tests, the benchmark, a launcher script)."""

import time
from pathlib import Path


def wait_ready(proc, url, timeout_s=120, log=None):
    """Wait until the server process `proc` answers GET url/health (httpx); raise RuntimeError, with its log
    file's text, when it exits first or does not answer within timeout_s (then it is killed)."""
    import httpx

    said = lambda: Path(log).read_text() if log else ""  # noqa: E731
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{said()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not answer {url}/health in {timeout_s} s:\n{said()}")
