"""The tools print their own output only; -v shows the libraries' bars and warnings too."""

import json
import os
import subprocess
import sys

import pytest

from tests.support import pico
from tests.support.paths import REPO

# mergekit sets `config.torch_dtype` on every in-process merge, which transformers warns about
DEPRECATED = ("from transformers import LlamaConfig\n"
              "LlamaConfig().torch_dtype = 'float32'\n")


def _env() -> dict:
    # conftest quiets transformers for the test process, and a tool run in-process by an
    # earlier test leaves HF_HUB_DISABLE_PROGRESS_BARS set (for its children); these children
    # start as a user's do
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    return {**env, "HF_HUB_OFFLINE": "1"}


def _stderr(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stderr


def test_quiet_libraries_hides_the_torch_dtype_warning():
    assert "`torch_dtype` is deprecated" in _stderr(DEPRECATED)  # what it hides is real
    assert _stderr("from mergekit_com.quiet import quiet_libraries\n"
                   "quiet_libraries()\n" + DEPRECATED) == ""


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A pico model and one task file, as `python -m mergekit_com.evaluate` reads them."""
    root = tmp_path_factory.mktemp("quiet")
    config = pico.llama_config(layers=1)
    model = pico.save_model(str(root / "model"), config, pico.random_state(config, seed=0))
    (root / "t.eval.jsonl").write_text(json.dumps({"prompt": "ab", "answer": "c"}) + "\n")
    return model, str(root)


@pytest.mark.parametrize("verbose", [False, True])
def test_evaluate_prints_no_loading_bars_unless_verbose(scored, verbose):
    model, zoo = scored
    r = subprocess.run([sys.executable, "-m", "mergekit_com.evaluate", model, "--zoo", zoo,
                        *(["-v"] if verbose else [])], capture_output=True, text=True, cwd=REPO,
                       env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| model | t | mean |" in r.stdout
    assert ("Loading weights" in r.stderr) == verbose, r.stderr
    if not verbose:
        assert r.stderr == ""
