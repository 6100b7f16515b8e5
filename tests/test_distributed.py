"""Two gloo processes on the CPU give exactly the one-process catalogue cache and metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmrec.utils.distributed import gather_rows, shard_batches

REPO = Path(__file__).resolve().parents[1]
CPU_DDP = REPO / "configs" / "accelerate" / "cpu_ddp.yaml"


def launch(script: list[str], config_file: Path = CPU_DDP) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file), *script],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )


class _OneOfTwo:
    """Stands in for rank `process_index` of a 2-process Accelerator for `shard_batches` (no gather)."""

    num_processes = 2

    def __init__(self, process_index: int):
        self.process_index = process_index

    def split_between_processes(self, inputs):
        from contextlib import nullcontext

        per_process, extra = divmod(len(inputs), 2)
        start = self.process_index * per_process + min(self.process_index, extra)
        return nullcontext(inputs[start : start + per_process + (self.process_index < extra)])


@pytest.mark.parametrize("count", [0, 1, 2, 5, 6, 11])
def test_shard_batches_cover_every_batch_once_round_robin(count):
    batches = list(range(count))
    shards = [shard_batches(_OneOfTwo(rank), batches) for rank in (0, 1)]
    assert shards == [batches[0::2], batches[1::2]]
    assert sorted(shards[0] + shards[1]) == batches


def test_one_process_gather_writes_rows_in_place():
    out = torch.zeros(5, 2)
    gather_rows(None, torch.tensor([3, 1]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]), out)
    assert out.tolist() == [[0, 0], [3, 4], [0, 0], [1, 2], [0, 0]]


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path, tiny_encoder_dir):
    completed = launch(["tests/scripts/distributed_check.py", str(tiny_encoder_dir), str(tmp_path)])
    assert completed.returncode == 0, completed.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        assert report["num_processes"] == 2
        for cache in report["cache"].values():
            assert cache["max_abs_difference"] <= 1e-6
            assert cache["zero_row_0"] and cache["rows"] == 42 and cache["nonzero_rows"] == 41
        for case, metrics in report["metrics"].items():
            local, distributed = metrics["local"], metrics["distributed"]
            assert distributed["num_users"] == local["num_users"], case
            assert set(distributed) == set(local)
            for name in local:
                assert distributed[name] == pytest.approx(local[name], abs=1e-6), (case, name)
        for case, lists in report["top_items"].items():
            assert lists["distributed"] == lists["local"], case  # every user's top-10 list, gathered by position
            assert all(row[0] > 0 for row in lists["local"]), case
    assert reports[0]["metrics"] == reports[1]["metrics"]
