"""Small helpers shared by the test modules (imported as `from helpers import ...`; pytest puts this folder on
sys.path)."""

import os
import threading


def cpus(n):
    """A device list of n CPU replicas: how torch_dp runs several replicas without a GPU."""
    return ["cpu"] * n


def os_threads():
    """This process's OS threads (torch_dp's workers are C++ threads, invisible to the threading module)."""
    return len(os.listdir("/proc/self/task"))


def run_in_threads(target, count, timeout=60):
    """Runs target(i) for i in range(count) on that many Python threads at once and waits for them; fails
    if one has not finished within `timeout` seconds (a hang) instead of blocking the suite."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads), f"a thread did not finish within {timeout} s"
