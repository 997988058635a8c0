"""CoM end to end on a pico model of each supported architecture."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.support.every_linear import assert_every_linear_is_closed_form
from tests.support.merging import com_config, experts, merge
from tests.support.pico_archs import ARCHS, build_arch_experts


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_architecture_merges_to_the_closed_form(arch, tmp_path):
    zoo = build_arch_experts(str(tmp_path / "zoo"), arch)
    out = str(tmp_path / "out")
    merged = merge(com_config(experts(zoo), alpha=0.9, ridge=1e-6), out)

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    checked = assert_every_linear_is_closed_form(
        out, [zoo["expert0"], zoo["expert1"]], [zoo["expert0_data"], zoo["expert1_data"]],
        alpha=lambda _n: 0.9, ridge=1e-6,
    )
    assert len(checked) >= 4 * 2  # attention and MLP linears of both layers at least

    head = model.get_output_embeddings().weight
    embed = model.get_input_embeddings().weight
    if zoo["config"].tie_word_embeddings:
        # the tie survives: no separate head is written or solved
        assert model.config.tie_word_embeddings
        assert not any(n.startswith("lm_head") for n in merged)
        assert head.data_ptr() == embed.data_ptr()
    else:
        assert "lm_head" in checked
        assert not torch.equal(head, embed)
