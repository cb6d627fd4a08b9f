"""What the benchmarks share."""

from __future__ import annotations

import signal
import subprocess


def stop(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """SIGTERM a daemon the benchmark started and wait for it (it stops its sandboxes first); SIGKILL it after
    `timeout` seconds. True if it stopped by itself."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False
