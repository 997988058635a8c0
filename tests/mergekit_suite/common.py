"""``tests/common.py`` for mergekit's own test suite, which its sdist does not ship.

Written from what mergekit 0.1.5's tests import from it: tiny random models of
the architectures they merge, and ``run_and_check_merge``. ``run_suite.py``
copies it next to the downloaded tests; it is not part of this package's suite.
"""

import os
import tempfile
from typing import Callable, Optional

from transformers import (
    AutoConfig,
    CLIPVisionConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from mergekit.architecture import arch_info_for_config, get_architecture_info
from mergekit.config import MergeConfiguration
from mergekit.io.lazy_tensor_loader import LazyTensorLoader, ShardedTensorIndex
from mergekit.merge import MergeOptions, run_merge


def run_and_check_merge(
    config: MergeConfiguration,
    check_nan: bool = True,
    check_tensors: bool = True,
    validate: Optional[Callable[[str], None]] = None,
    index_json_name: str = "model.safetensors.index.json",
    auto_arch: bool = False,
):
    """Merge into a temporary folder; check it holds a model, no NaN, every weight."""
    with tempfile.TemporaryDirectory() as out:
        run_merge(config, out_path=out, options=MergeOptions())
        index = os.path.join(out, index_json_name)
        assert os.path.exists(index) or os.path.exists(index.removesuffix(".index.json")), (
            "No model produced by merge")
        assert os.path.exists(os.path.join(out, "config.json")), "No config.json produced"
        if check_nan:
            loader = LazyTensorLoader.from_disk(out, lazy_unpickle=False)
            for name in sorted(loader.index.tensor_paths):
                assert not loader.get_tensor(name).isnan().any(), f"NaN in {name}"
        if check_tensors:
            model_config = AutoConfig.from_pretrained(out)
            arch = (get_architecture_info(config, MergeOptions()) if auto_arch
                    else arch_info_for_config(model_config))
            written = ShardedTensorIndex.from_disk(out).tensor_paths
            for weight in arch.all_weights(model_config):
                if not weight.optional and weight.name not in written and not any(
                        a in written for a in weight.aliases):
                    raise AssertionError(f"Output missing tensor {weight.name}")
        if validate:
            validate(out)


def _save(model, path) -> str:
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def _pico_llama_config(vocab_size: int = 64) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                       num_attention_heads=16, num_hidden_layers=2)


def make_picollama(path, vocab_size: int = 64) -> str:
    return _save(LlamaForCausalLM(_pico_llama_config(vocab_size)), path)


def make_picogranite(path) -> str:
    config = GraniteConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                           num_attention_heads=16, num_key_value_heads=4, num_hidden_layers=2)
    return _save(GraniteForCausalLM(config), path)


def make_gpt2size(path) -> str:
    """GPT-2 (124M) dimensions: 12 layers, as test_gpt2_stack's layer_range expects."""
    config = GPT2Config(n_ctx=1024, n_embd=768, n_head=12, n_layer=12, n_positions=1024,
                        vocab_size=50257)
    return _save(GPT2LMHeadModel(config), path)


def make_picoLlaVa(path) -> str:  # noqa: N802 (the name mergekit's tests import)
    vision = CLIPVisionConfig(image_size=32, patch_size=4, num_hidden_layers=2,
                              num_attention_heads=2, hidden_size=64, intermediate_size=128)
    config = LlavaConfig(vision_config=vision, text_config=_pico_llama_config(),
                         image_seq_length=16)
    return _save(LlavaForConditionalGeneration(config), path)
