"""glibc's malloc thresholds (method/allocator.py): set once per process, seen as a
forward over padded batches faulting no pages in once warm; a user's own settings are
left alone."""

import json
import os
import platform
import subprocess
import sys

import pytest

from mergekit_com.method import allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A tiny Llama over five padded batches, as the walk runs them, three times once warm;
# the pass that faulted fewest pages in is kept: 1-2 with our thresholds, 1.0k-18.7k with
# glibc's own, 79k with its start threshold fixed (8, 4 and 3 runs).
FORWARD = """
import json, resource, torch
from transformers import LlamaConfig, LlamaModel
from mergekit_com.method.allocator import tune_malloc
tuned = tune_malloc()
torch.set_num_threads(1)
torch.manual_seed(0)
model = LlamaModel(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=192,
                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                               max_position_embeddings=64)).eval()
def batch(n):
    mask = (torch.arange(n)[None, :] < torch.randint(n // 2, n + 1, (128, 1))).long()
    return dict(input_ids=torch.randint(0, 64, (128, n)), attention_mask=mask)
batches = [batch(n) for n in (19, 18, 17, 16, 15)]
with torch.no_grad():
    for b in batches + batches:
        model(**b)
    faults = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for b in batches:
            model(**b)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"tuned": tuned, "tuned_again": tune_malloc(), "faults": min(faults)}))
"""


def _run(**env) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if k not in allocator.USER_SETTINGS and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", FORWARD], env={**clean, **env}, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_a_tuned_forward_reuses_freed_memory():
    got = _run()
    assert got["tuned"] and got["tuned_again"]
    assert got["faults"] < 200


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_thresholds_the_user_set_are_left_alone():
    # glibc's start threshold, fixed by the user: kept, so the pass faults its blocks in anew
    got = _run(MALLOC_MMAP_THRESHOLD_="131072")
    assert not got["tuned"]
    assert got["faults"] > 2000


def test_glibc_tunables_are_left_alone(monkeypatch):
    for setting in allocator.USER_SETTINGS:
        monkeypatch.delenv(setting, raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1048576")
    assert allocator._set_thresholds() is False
