"""Reaching an input model's files through mergekit's ``ModelReference``: its local
folder (a LoRA applied first), config, weight files and tokenizer, each failure as
one line naming the model."""

from __future__ import annotations

import json
import os
from typing import List, Tuple

from mergekit.common import ModelReference

from mergekit_com.errors import CalibrationError, ChainConfigError, first_line


def merged_reference(model: ModelReference, options) -> ModelReference:
    """The model as mergekit reads it: a ``model+adapter`` merged into ``--lora-merge-cache``
    (as mergekit itself would next), any other model as it is."""
    if model.lora is not None and not options.lora_merge_cache:
        raise ChainConfigError(
            f"model {model} has a LoRA adapter, which mergekit merges into a folder first: "
            "pass --lora-merge-cache DIR (outside out_path)")
    try:
        return model.merged(cache_dir=options.lora_merge_cache,
                            trust_remote_code=options.trust_remote_code,
                            lora_merge_dtype=options.lora_merge_dtype)
    except Exception as e:
        raise ChainConfigError(f"model {model}: its LoRA could not be applied ({first_line(e)})") from None


def local_dir(model: ModelReference, options) -> str:
    merged = merged_reference(model, options)
    path = merged.model.path
    if path.startswith((".", "/", "~")) or path.count("/") > 1:  # as mergekit's card tells
        if os.path.exists(os.path.expanduser(path)):
            if not os.path.isdir(os.path.expanduser(path)):
                raise ChainConfigError(
                    f"model {model} is a file, not a model folder; give the folder that holds "
                    "its config.json and weights")
        else:
            raise ChainConfigError(f"model {model} does not exist; check the path")
    try:
        return merged.local_path(cache_dir=options.transformers_cache)
    except Exception as e:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise ChainConfigError(
                f"model {model} is not a local folder, and with HF_HUB_OFFLINE set the Hugging "
                "Face hub is not asked for it (nor is it in the local cache); check the path, "
                "or download it first") from None
        raise ChainConfigError(
            f"model {model}: not a local directory and not available from the Hugging Face "
            f"hub ({first_line(e)}); check the path"
        ) from None


def load_config(model: ModelReference, path: str, options):
    try:
        return model.config(trust_remote_code=options.trust_remote_code)
    except Exception as e:
        config_file = os.path.join(path, "config.json")
        auto_map = None
        if os.path.isfile(config_file):
            try:
                with open(config_file, encoding="utf-8") as fp:
                    auto_map = json.load(fp).get("auto_map")
            except (ValueError, AttributeError):
                pass
        if auto_map and not options.trust_remote_code:
            raise ChainConfigError(
                f"model {model} needs its own Python code to load (config.json has auto_map); "
                "that code is not run unless you pass --trust-remote-code (review it first)"
            ) from None
        raise ChainConfigError(f"model {model}: its config could not be loaded ({first_line(e)})") from None


def weight_files(model: ModelReference, path: str) -> Tuple[bool, List[str]]:
    """The weight files mergekit reads (the same choice as its ShardedTensorIndex)."""
    for name, safe in (("model.safetensors", True), ("pytorch_model.bin", False)):
        index = os.path.join(path, name + ".index.json")
        if os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as fp:
                    weight_map = json.load(fp)["weight_map"]
                return safe, sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError) as e:
                raise ChainConfigError(f"model {model}: {name}.index.json is malformed ({e})") from None
        if os.path.exists(os.path.join(path, name)):
            return safe, [name]
    raise ChainConfigError(
        f"model {model}: no model.safetensors or pytorch_model.bin (nor a sharded index) in {path}"
    )


def model_tokenizer(model: ModelReference, options):
    """The expert's tokenizer; a LoRA-merged copy has none, so fall back to the
    adapter's folder, then the base model's."""
    from transformers import AutoTokenizer

    merged = merged_reference(model, options)
    places = [merged.model] + ([model.lora, model.model] if model.lora else [])
    for place in places:
        try:
            return AutoTokenizer.from_pretrained(
                place.path, revision=place.revision,
                trust_remote_code=options.trust_remote_code,
            )
        except (OSError, ValueError, TypeError) as e:
            error = e
    raise CalibrationError(
        f"model {model}: its tokenizer could not be loaded from "
        f"{', '.join(p.path for p in places)} ({_tokenizer_problem(places[0].path, error)})"
    )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "merges.txt", "special_tokens_map.json", "vocab.txt")


def _tokenizer_problem(path: str, error: BaseException) -> str:
    """Why a local folder's tokenizer did not load, naming the file where one is at fault
    (transformers' own message names none and runs over several lines)."""
    if os.path.isdir(path):
        present = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(path, f))]
        if not present:
            return f"it has none of the tokenizer files {', '.join(TOKENIZER_FILES[:4])}"
        for name in present:
            if name.endswith(".json"):
                try:
                    with open(os.path.join(path, name), encoding="utf-8") as fp:
                        json.load(fp)
                except (ValueError, OSError) as e:
                    return f"{name} is not valid JSON: {first_line(e)}"
    return first_line(error)
