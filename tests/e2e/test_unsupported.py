"""What CoM cannot walk is refused at planning, naming the architecture, before any output."""


import pytest
import torch
from transformers import AutoModelForCausalLM

from mergekit_com.errors import ChainConfigError
from tests.support import pico
from tests.support.merging import com_config, merge


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(
        vocab_size=pico.VOCAB, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8,
        decoder_start_token_id=0))


def _llava():
    from transformers import (
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    text = pico.llama_config(layers=1, vocab_size=pico.VOCAB + 1)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, image_size=28, patch_size=14)
    return LlavaForConditionalGeneration(LlavaConfig(
        text_config=text, vision_config=vision, image_token_index=pico.VOCAB))


def _mixtral():
    return AutoModelForCausalLM.from_config(
        pico.llama_config(layers=1, arch="mixtral", num_local_experts=2, num_experts_per_tok=1))


def _qwen3_moe():
    return AutoModelForCausalLM.from_config(
        pico.llama_config(layers=1, arch="qwen3_moe", head_dim=8, num_experts=2,
                          num_experts_per_tok=1, moe_intermediate_size=16))


def _llama_with_attention_bias():
    return AutoModelForCausalLM.from_config(pico.llama_config(layers=1, attention_bias=True))


def _llama_classifier():
    from transformers import LlamaForSequenceClassification

    return LlamaForSequenceClassification(pico.llama_config(layers=1, num_labels=2))


def _cohere_without_qk_norm():  # as Command-R: mergekit's description still reads q_norm
    return AutoModelForCausalLM.from_config(pico.llama_config(layers=1, arch="cohere", use_qk_norm=False))


def _gpt_neox():  # transformers names the checkpoint's embed_out.weight lm_head.weight
    from transformers import AutoConfig

    return AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gpt_neox", vocab_size=pico.VOCAB, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=4, intermediate_size=64, max_position_embeddings=256))


CASES = {
    "t5": (_t5, r"T5ForConditionalGeneration: it is an encoder-decoder model"),
    "llava": (_llava, r"LlavaForConditionalGeneration: it has a vision_config"),
    "mixtral": (_mixtral, r"MixtralForCausalLM: it is a mixture-of-experts model"),
    "qwen3_moe": (_qwen3_moe, r"Qwen3MoeForCausalLM: it is a mixture-of-experts model"),
    "attention_bias": (_llama_with_attention_bias,
                       r"definition for LlamaForCausalLM does not list "
                       r"model\.layers\.0\.self_attn\.q_proj\.bias"),
    "cohere": (_cohere_without_qk_norm,
               r"has no tensor model\.layers\.0\.self_attn\.q_norm\.weight, which mergekit's "
               r"description of CohereForCausalLM reads \(and does not mark optional\)"),
    "gpt_neox": (_gpt_neox, r"definition for GPTNeoXForCausalLM does not list lm_head\.weight \(it "
                            r"lists embed_out\.weight, which transformers names otherwise"),
    "classifier": (_llama_classifier,
                   r"LlamaForSequenceClassification: it is not a causal LM"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_at_planning_naming_the_architecture(case, tmp_path, monkeypatch):
    build, message = CASES[case]
    torch.manual_seed(0)
    path = str(tmp_path / case)
    build().save_pretrained(path)
    pico.make_tokenizer().save_pretrained(path)
    data = pico.write_jsonl(str(tmp_path / "d.jsonl"), pico.sample_texts(0))

    from mergekit_com.integration import chain_task

    def never(*_a, **_k):
        raise AssertionError("the walk started")

    monkeypatch.setattr(chain_task, "run_chain", never)
    out = tmp_path / "out"
    with pytest.raises(ChainConfigError, match=message):
        merge(com_config([{"model": path, "calibration": data}]), str(out))
    assert not out.exists()
