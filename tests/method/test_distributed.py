"""This process's share of the machine under a launcher."""

import os

import torch

from mergekit_com.method.distributed import cpu_threads


def test_threads_honour_the_request_and_never_oversubscribe_under_a_launcher(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    assert cpu_threads(3) == 3
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cpu_threads(None) == min(torch.get_num_threads(), cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * cores))  # more ranks than cores
    assert cpu_threads(None) == 1
