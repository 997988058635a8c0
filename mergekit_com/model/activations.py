"""Where the activations entering the current layer live between layers.

The chain keeps, per expert and calibration batch, the hidden states entering
the next layer (merged prefix and/or the expert's own model). They are stored
in ``activation_dtype`` (bfloat16 by default on GPU, float32 on CPU) and
handed back in the compute dtype (float32, or float64 for ``dtype: float64``) for
the next forward and Gram. While they fit the budget they stay on the compute
device; past it they go to CPU memory (when computing on GPU) and then to disk
(safetensors files in a private temporary directory), transparently: the engine
only sees lists of tensors.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Dict, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

LOG = logging.getLogger(__name__)

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
BUDGET_SHARE = 0.5  # of the free memory at start, when no budget is given

Key = Tuple[str, int, int]  # (kind, expert index, batch index)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def free_bytes(device: torch.device) -> int:
    """Free memory where the activations would live first."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def resolve_budget(gigabytes: float, device: torch.device) -> int:
    """Bytes the cache may keep on the compute device (0 = a share of free memory)."""
    if gigabytes and gigabytes > 0:
        return int(gigabytes * 2**30)
    return int(BUDGET_SHARE * free_bytes(device))


class ActivationStore:
    """Tensors by key, on the device while within budget, then CPU, then disk."""

    def __init__(self, device: torch.device, dtype: torch.dtype, budget: int,
                 host_budget: Optional[int] = None, compute_dtype: torch.dtype = torch.float32):
        self.device, self.dtype, self.budget = device, dtype, budget
        self.compute_dtype = compute_dtype
        # the CPU tier only exists when computing on GPU; its budget is free RAM's share
        self.host_budget = 0 if device.type == "cpu" else (
            host_budget if host_budget is not None else resolve_budget(0, torch.device("cpu")))
        self._tiers: Dict[Key, str] = {}
        self._data: Dict[Key, torch.Tensor] = {}
        self._bytes = {"device": 0, "host": 0}
        self._dir: Optional[str] = None
        self.spilled = {"host": 0, "disk": 0}  # how many tensors ever went to each tier

    @property
    def free_bytes(self) -> int:
        """What is left of the device budget (other work on the device may use it)."""
        return max(0, self.budget - self._bytes["device"])

    def _size(self, t: torch.Tensor) -> int:
        return t.numel() * self.dtype.itemsize

    def _drop(self, key: Key) -> None:
        tier = self._tiers.pop(key, None)
        if tier == "disk":
            os.remove(self._path(key))
        elif tier is not None:
            self._bytes[tier] -= self._size(self._data.pop(key))

    def _path(self, key: Key) -> str:
        return os.path.join(self._dir, "{}-{}-{}.safetensors".format(*key))

    def put(self, key: Key, tensor: torch.Tensor) -> None:
        self._drop(key)
        value = tensor.detach().to(self.dtype)
        size = self._size(value)
        if self._bytes["device"] + size <= self.budget:
            tier, value = "device", value.to(self.device)
        elif self._bytes["host"] + size <= self.host_budget:
            tier, value = "host", value.to("cpu")
        else:
            tier = "disk"
        if tier != "device" and not self.spilled["host"] + self.spilled["disk"]:
            LOG.info("activation cache over its %.2f GB budget: spilling to %s", self.budget / 2**30,
                     "CPU memory" if tier == "host" else "disk")
        if tier == "disk":
            if self._dir is None:
                self._dir = tempfile.mkdtemp(prefix="mergekit-com-activations-")
            save_file({"h": value.cpu().contiguous()}, self._path(key))
        else:
            self._data[key] = value
            self._bytes[tier] += size
        if tier != "device":
            self.spilled[tier] += 1
        self._tiers[key] = tier

    def get(self, key: Key) -> torch.Tensor:
        """The tensor on the compute device, in the compute dtype."""
        tier = self._tiers[key]
        value = load_file(self._path(key))["h"] if tier == "disk" else self._data[key]
        return value.to(device=self.device, dtype=self.compute_dtype)

    def close(self) -> None:
        self._tiers.clear()
        self._data.clear()
        self._bytes = {"device": 0, "host": 0}
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


class CachedList:
    """A list-like view of one (kind, expert) stream of batches in a store."""

    def __init__(self, store: ActivationStore, kind: str, expert: int):
        self.store, self.kind, self.expert = store, kind, expert
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def append(self, tensor: torch.Tensor) -> None:
        self.store.put((self.kind, self.expert, self._n), tensor)
        self._n += 1

    def __getitem__(self, b: int) -> torch.Tensor:
        if not 0 <= b < self._n:
            raise IndexError(b)
        return self.store.get((self.kind, self.expert, b))

    def __setitem__(self, b: int, tensor: torch.Tensor) -> None:
        if not 0 <= b < self._n:
            raise IndexError(b)
        self.store.put((self.kind, self.expert, b), tensor)
