"""mergekit's own settings that it would ignore, or fail on mid-merge, stop a chain merge first."""

from types import SimpleNamespace

import pytest

from mergekit_com.errors import ChainConfigError
from mergekit_com.integration.validation import check_config_keys, check_config_values

MODELS = "models:\n  - model: ./a\n    parameters: {calibration: a.jsonl}\n"


def test_every_key_mergekit_reads_is_accepted():
    check_config_keys("merge_method: chain_of_merges\nbase_model: ./b\ndtype: float32\nout_dtype: bfloat16\n"
                      "tokenizer_source: union\nchat_template: auto\nparameters: {alpha: 0.5}\n" + MODELS)
    check_config_keys(None)  # a configuration built in Python: nothing to read


@pytest.mark.parametrize("text, where, key, hint", [
    ("merge_method: chain_of_merges\n" + MODELS + "paramters: {alpha: 0.5}\n", "config", "paramters",
     "did you mean 'parameters'?"),
    ("merge_method: chain_of_merges\nmodels:\n  - model: ./a\n    parameter: {calibration: a.jsonl}\n",
     "models[0]", "parameter", "did you mean 'parameters'?"),
    ("merge_method: chain_of_merges\n" + MODELS + "colour: blue\n", "config", "colour", "valid keys"),
])
def test_a_key_mergekit_would_ignore_is_named(text, where, key, hint):
    with pytest.raises(ChainConfigError) as e:
        check_config_keys(text)
    assert str(e.value).startswith(f"{where}: unknown key '{key}'") and hint in str(e.value)


def _config(**kw):
    return SimpleNamespace(**{"dtype": None, "out_dtype": None, "chat_template": None,
                              "tokenizer_source": None, **kw})


@pytest.mark.parametrize("value", ["float32", "bfloat16", "float16", "float64", "torch.bfloat16", None])
def test_dtypes_mergekit_can_write_pass(value):
    check_config_values(_config(dtype=value, out_dtype=value))


@pytest.mark.parametrize("key, value, says", [
    ("dtype", "bf16", "did you mean 'bfloat16'?"),
    ("out_dtype", "int8", "use one of float32, bfloat16, float16, float64"),
    ("chat_template", "chatm", "did you mean 'chatml'?"),
    ("chat_template", "{% for m in messages %}{{ m.content }", "not a valid Jinja template"),
    ("chat_template", "{{ x }}", "too short"),
])
def test_settings_that_would_fail_mid_merge_stop_first(key, value, says):
    with pytest.raises(ChainConfigError, match=key) as e:
        check_config_values(_config(**{key: value}))
    assert says in str(e.value) and "\n" not in str(e.value)


def test_named_and_whole_chat_templates_pass():
    check_config_values(_config(chat_template="chatml"))
    check_config_values(_config(chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}"))
