import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Merges in child processes must use the thread count of the in-process references they
# are compared with bit for bit: BLAS sums in another order with another thread count.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models on 2 shared cores: one thread is far faster than the default.
torch.set_num_threads(1)
from tests.support import pico  # noqa: E402


@pytest.fixture(scope="session")
def zoo2(tmp_path_factory):
    """base + 2 experts (all tensors perturbed), 2 layers, hidden 32."""
    return pico.build_experts(str(tmp_path_factory.mktemp("zoo2")), n_experts=2, layers=2)


@pytest.fixture(scope="session")
def zoo_linear_only(tmp_path_factory):
    """Experts that differ from the base only in their linear weights."""
    return pico.build_experts(
        str(tmp_path_factory.mktemp("zoo_lin")), n_experts=2, layers=2,
        only=pico.is_linear_weight,
    )
