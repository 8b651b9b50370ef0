"""The seed demo: examples/python/tutorial.py prints the chunk sizes of PyTorch's data-parallelism tutorial."""

import collections
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _chunks(rows, replicas):
    return [c.shape[0] for c in torch.arange(rows).chunk(replicas)]


@pytest.mark.parametrize("replicas", [2, 3, 4, 8])
def test_tutorial_prints_the_tutorials_chunk_sizes(replicas):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples/python/tutorial.py"), "--device", "cpu", "--replicas", str(replicas)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    )
    inside_sizes = re.findall(r"In Model: input size torch\.Size\(\[(\d+), 5\]\)", result.stdout)
    inside = collections.Counter(int(m) for m in inside_sizes)
    outside_pattern = r"Outside: input size torch\.Size\(\[(\d+), 5\]\) output_size torch\.Size\(\[(\d+), 2\]\)"
    outside = re.findall(outside_pattern, result.stdout)
    # 100 rows in batches of 30: 30, 30, 30 and 10, each split by torch.chunk over the replicas.
    assert [(int(a), int(b)) for a, b in outside] == [(30, 30), (30, 30), (30, 30), (10, 10)]
    expected = collections.Counter(_chunks(30, replicas) * 3 + _chunks(10, replicas))
    assert inside == expected
    if replicas == 8:  # the example: seven chunks of 4 and one of 2; the last batch five of 2
        assert _chunks(30, 8) == [4] * 7 + [2] and _chunks(10, 8) == [2] * 5
