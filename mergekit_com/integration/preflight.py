"""Checks on the input models that stop a chain_of_merges run before heavy work.

``check_models`` reads only configs, tokenizers and weight-file headers
(pickled ``.bin`` files are opened with the weights-only unpickler, which
refuses anything but tensors, so no code in them ever runs).
``check_calibration`` reads and tokenizes each expert's calibration data.
``scan_weights`` reads every tensor once for NaN/Inf: as much I/O as the
merge's own loading, but none of its compute, so it runs last.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from typing import Dict, List, Optional, Tuple

import torch
import tqdm
from mergekit.common import ModelReference

from mergekit_com.errors import CalibrationError, ChainConfigError, OutputError, first_line, listed
from mergekit_com.integration.config_views import (
    calibration_sources,
    ordered_models,
    slice_lists,
    tokenizer_source,
)
from mergekit_com.integration.models import (
    load_config,
    local_dir,
    model_tokenizer,
    weight_files,
)
from mergekit_com.io.calibration import CalibrationSet, load_calibration, load_labeled
from mergekit_com.io.datasets_source import RecordSpec
from mergekit_com.io.inputs import not_regular, tree_entries, within
from mergekit_com.io.workdir import WorkDir
from mergekit_com.method.linalg import all_finite

LOG = logging.getLogger("mergekit.chain_of_merges.preflight")  # under mergekit's logger
Shapes = Dict[str, Tuple[int, ...]]


def safe_unpickle(path: str, shown: str) -> Dict[str, torch.Tensor]:
    """A pickled checkpoint through the weights-only unpickler, on the meta device.

    Explicit ``weights_only=True`` holds even when the environment sets
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``; once this succeeded, mergekit's own
    loads of the same file can only build tensors too.
    """
    try:
        state = torch.load(path, map_location="meta", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it refers to {found.group(1)}" if found else "not a plain tensor checkpoint"
        raise ChainConfigError(
            f"{shown} holds pickled objects other than tensors ({what}); it was not "
            "unpickled, since that could run code. Use a safetensors copy of this model"
        ) from None
    except Exception as e:
        raise ChainConfigError(f"{shown} could not be read as a PyTorch checkpoint ({first_line(e)})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ChainConfigError(f"{shown} is not a state dict of tensors")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def tensor_shapes(model: ModelReference, path: str) -> Shapes:
    from safetensors import safe_open

    safe, files = weight_files(model, path)
    shapes: Shapes = {}
    for name in files:
        full = os.path.join(path, name)
        shown = f"model {model}: {name}"
        if not os.path.isfile(full):
            raise ChainConfigError(f"{shown} is listed in the index but missing")
        if safe:
            try:
                with safe_open(full, framework="pt") as f:
                    shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
            except Exception as e:
                raise ChainConfigError(f"{shown} is not a readable safetensors file ({first_line(e)})") from None
        else:
            shapes.update({k: tuple(v.shape) for k, v in safe_unpickle(full, shown).items()})
    return shapes


# Each model's tensor names as check_models read them, for check_planned_tensors.
_TENSOR_NAMES: Dict[ModelReference, set] = {}


def check_planned_tensors(save_tasks, architecture: str) -> None:
    """Every tensor mergekit's plan reads without being told it may be missing exists in
    its model (under its name, an alias or a tied name). Where mergekit's architecture
    description and a checkpoint disagree (a tied head it does not mark optional, a
    q_norm the config turns off), mergekit would fail on it in the middle of the merge."""
    from mergekit.io.tasks import GatherTensors

    for save in save_tasks:
        gather = save.tensor_task.gather_tensors
        # under tokenizer_source, the vocabulary's permutation; under
        # --unsafe-truncate-embeddings, its truncation: each wraps the gather
        while not isinstance(gather, GatherTensors) and hasattr(gather, "gather_tensors"):
            gather = gather.gather_tensors
        if not isinstance(gather, GatherTensors):
            continue
        for model, info in gather.weight_info.items():
            names = _TENSOR_NAMES.get(model)
            if names is None or info.optional:
                continue
            known = [info.name, *(info.aliases or ()), *(getattr(info, "tied_names", None) or ())]
            if not any(n in names for n in known):
                raise ChainConfigError(
                    f"model {model} has no tensor {info.name}, which mergekit's description of "
                    f"{architecture} reads (and does not mark optional); mergekit cannot merge "
                    "this checkpoint as saved. If the model ties that tensor to another, save it "
                    "untied (with the tensor written out)"
                )


# Tokenizers the vocabulary check loaded from a model's own folder (no LoRA: the first
# place model_tokenizer looks), handed once to the calibration check of the same plan.
_TOKENIZERS: Dict[ModelReference, object] = {}


def _vocabulary(model: ModelReference, options) -> Optional[Dict[str, int]]:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            model.model.path, revision=model.model.revision,
            trust_remote_code=options.trust_remote_code,
        )
    except Exception:
        return None  # no tokenizer: reported where calibration needs one
    if model.lora is None:
        _TOKENIZERS[model] = tok
    return tok.get_vocab()


def check_models(config, options) -> Dict[ModelReference, str]:
    """Same architecture, same vocabulary, same tensor shapes; weights safely readable.

    Returns each model's local directory.
    """
    models = ordered_models(config)
    _TOKENIZERS.clear()
    paths = {m: local_dir(m, options) for m in models}
    for m in models:
        check_regular_files(m, paths[m])
    configs = {m: load_config(m, paths[m], options) for m in models}
    first = models[0]

    def arch(m):
        return (configs[m].model_type, tuple(configs[m].architectures or ()))

    for m in models[1:]:
        if arch(m) != arch(first) and arch(m)[0] == arch(first)[0] and not all(
                arch(x)[1] for x in (m, first)):
            lacking, other = (m, first) if not arch(m)[1] else (first, m)
            raise ChainConfigError(
                f"model {lacking}: its config.json names no architectures (model_type "
                f"{arch(lacking)[0]}), while {other}'s names {'/'.join(arch(other)[1])}; add "
                f"\"architectures\": {json.dumps(list(arch(other)[1]))} to it if it is that model"
            )
        if arch(m) != arch(first):
            raise ChainConfigError(
                f"model {m} is a {'/'.join(arch(m)[1]) or arch(m)[0]} but {first} is a "
                f"{'/'.join(arch(first)[1]) or arch(first)[0]}; {config.merge_method} merges "
                "models of one architecture fine-tuned from one base"
            )

    for m in models[1:]:
        depths = [getattr(configs[x], "num_hidden_layers", None) for x in (m, first)]
        if depths[0] != depths[1]:
            raise ChainConfigError(
                f"model {m} has {depths[0]} layers (num_hidden_layers in its config.json) but "
                f"{first} has {depths[1]}; {config.merge_method} merges models of one size "
                "fine-tuned from one base"
            )

    shapes = {m: tensor_shapes(m, paths[m]) for m in models}
    _TENSOR_NAMES.clear()
    _TENSOR_NAMES.update({m: set(shapes[m]) for m in models})

    if tokenizer_source(config) is None:
        vocabs = {m: _vocabulary(m, options) for m in models}
        for m in models[1:]:
            sizes = (getattr(configs[m], "vocab_size", None), getattr(configs[first], "vocab_size", None))
            differ = sizes[0] != sizes[1] or (
                vocabs[m] is not None and vocabs[first] is not None and vocabs[m] != vocabs[first]
            )
            if differ:
                truncate = (" (chain_of_merges does not truncate embeddings: "
                            "--unsafe-truncate-embeddings has nothing to do when they agree)"
                            if options.unsafe_truncate_embeddings else "")
                raise ChainConfigError(
                    f"models {first} and {m} have different vocabularies; set "
                    "`tokenizer_source: union` (or base, or one model) so that mergekit "
                    f"aligns their embeddings{truncate}"
                )

    for m in models[1:]:
        tied = getattr(configs[m], "tie_word_embeddings", False) or getattr(
            configs[first], "tie_word_embeddings", False)
        for name in sorted(set(shapes[first]) | set(shapes[m])):
            a, b = shapes[first].get(name), shapes[m].get(name)
            if a == b or (tied and "lm_head" in name):
                continue
            if a is not None and b is not None and tokenizer_source(config) is not None and (
                "embed" in name or "lm_head" in name
            ):
                continue  # vocabularies differ on purpose; mergekit aligns them
            if a is None or b is None:
                lacking, other = (first, m) if a is None else (m, first)
                detail = f"{lacking} lacks {name}, which {other} has"
            else:
                detail = f"{name} is {list(b)} in {m} but {list(a)} in {first}"
            raise ChainConfigError(
                f"models {first} and {m} differ in shape: {detail}; "
                f"{config.merge_method} merges models of one size fine-tuned from one base"
            )
    warn_config_differences(models, configs)
    check_layer_ranges(config, configs)
    check_token_sources(config, paths, options)
    return paths


# config.json fields that do not change what a layer computes (ids, bookkeeping, output
# switches); the vocabulary, depth and shapes are checked on their own
HARMLESS_CONFIG_KEYS = frozenset({
    "_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache", "architectures",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id",
    "task_specific_params", "auto_map", "attn_implementation", "_attn_implementation",
    "_attn_implementation_autoset", "vocab_size", "num_hidden_layers", "tie_word_embeddings",
    "problem_type", "finetuning_task", "tokenizer_class", "prefix", "chunk_size_feed_forward",
})


def warn_config_differences(models: List[ModelReference], configs) -> None:
    """Experts whose config.json differ where a layer's computation depends on it
    (rope_theta, rms_norm_eps, hidden_act, ...) are merged as if they all computed with the
    first model's (the base's, else the first listed), which the output config takes."""
    first = models[0]
    mine = configs[first].to_dict()
    for m in models[1:]:
        theirs = configs[m].to_dict()
        keys = sorted(k for k in set(mine) | set(theirs)
                      if k not in HARMLESS_CONFIG_KEYS and mine.get(k) != theirs.get(k))
        if keys:
            shown = listed([f"{k}: {theirs.get(k)!r} vs {mine.get(k)!r}" for k in keys], 4)
            LOG.warning(
                "models %s and %s differ in config.json (%s); the merged model takes %s's, "
                "as mergekit's output config does, so %s's layers are merged as if they "
                "computed with it", m, first, shown, first, m)


def check_layer_ranges(config, configs) -> None:
    """Every slice source's ``layer_range`` lies within its model's layers (mergekit
    would fail on the first missing tensor, once the merge has begun)."""
    for where, slices in slice_lists(config):
        for si, piece in enumerate(slices):
            for ri, source in enumerate(piece.sources):
                start, end = source.layer_range
                depth = getattr(configs.get(source.model), "num_hidden_layers", None)
                if start < 0 or end <= start or (isinstance(depth, int) and end > depth):
                    raise ChainConfigError(
                        f"{where}[{si}].sources[{ri}]: layer_range [{start}, {end}] of model "
                        f"{source.model} is not within its {depth} layers (num_hidden_layers in "
                        "its config.json); a range [start, end] takes layers start to end - 1"
                    )


def check_token_sources(config, paths: Dict[ModelReference, str], options) -> None:
    """Each ``tokenizer.tokens`` entry that takes its embedding from a merged model names a
    token that model has (mergekit asserts it while writing the embeddings)."""
    from mergekit.tokenizer.config import ModelTokenEmbedding

    tokens = getattr(getattr(config, "tokenizer", None), "tokens", None) or {}
    for token, spec in tokens.items():
        source = spec.source
        if isinstance(source, ModelTokenEmbedding):
            model, wanted = source.model, source.token
        elif isinstance(source, ModelReference):
            model, wanted = source, token
        else:
            continue  # zero, or the default: nothing to find
        if wanted is None or model not in paths:
            continue  # by id (mergekit checks its range), or a model not merged here
        vocab = _TOKENIZERS[model].get_vocab() if model in _TOKENIZERS else _vocabulary(model, options)
        if vocab is not None and wanted not in vocab:
            raise ChainConfigError(
                f"tokenizer.tokens: {token!r} takes its embedding from model {model}, whose "
                f"vocabulary has no {wanted!r}; name a token it has (source: {{kind: "
                "model_token, model: ..., token: ...}) or give source: {kind: zero}")


def check_regular_files(model: ModelReference, path: str) -> None:
    """Every file of a model folder is a regular file: nothing read from it can block."""
    for name in sorted(os.listdir(path)):
        kind = not_regular(os.path.join(path, name))
        if kind is not None:
            raise ChainConfigError(
                f"model {model}: {name} is {kind}, not a regular file; a model folder may "
                "hold only files and folders"
            )


def _inputs(config, model_dirs: Dict[ModelReference, str]) -> List[Tuple[str, str]]:
    """(what, real path) of every local input: model folders (as written and as read),
    LoRA folders, calibration files."""
    found = []
    for m, local in model_dirs.items():
        for path in (local, m.model.path, m.lora.path if m.lora else None):
            if path and os.path.exists(os.path.expanduser(path)):
                found.append((f"model {m}", os.path.realpath(os.path.expanduser(path))))
    for source in calibration_sources(config):
        if os.path.exists(os.path.expanduser(source)):
            found.append((f"calibration file {source}",
                          os.path.realpath(os.path.expanduser(source))))
    return found


def check_lora_cache(options, work: WorkDir) -> None:
    """``--lora-merge-cache``, where mergekit writes each ``model+adapter`` merged, lies
    outside out_path and its work directory: it is written before any other check."""
    if not options.lora_merge_cache:
        return
    cache = os.path.realpath(os.path.expanduser(options.lora_merge_cache))
    # out_path, the work directory and the names it takes for a moment (.new, .old, .lock)
    for ours in (work.target, *(work.path + s for s in ("", ".new", ".old", ".lock"))):
        if within(cache, ours):
            raise ChainConfigError(
                f"--lora-merge-cache {options.lora_merge_cache} is inside {ours}, where the "
                f"merge into out_path {work.shown} writes; choose a cache folder outside it")


def check_out_path(shown: str, ours: List[str], config,
                   model_dirs: Dict[ModelReference, str]) -> None:
    """out_path (and the work directory next to it) is no input, inside none, contains none;
    no input file is a symlink into them; and an existing out_path can be written (found
    before the merge, not when its result is published)."""
    target = ours[0]
    if os.path.isdir(target) and not os.access(target, os.W_OK | os.X_OK,
                                               effective_ids=os.access in os.supports_effective_ids):
        raise OutputError(f"out_path {shown} is not writable; make it writable or choose another "
                          "out_path")
    for what, path in _inputs(config, model_dirs):
        if path == target:
            relation = "is"
        elif within(target, path):
            relation = "is inside"
        elif within(path, target):
            relation = "contains"
        else:
            continue
        raise ChainConfigError(
            f"out_path {shown} {relation} {what}: the merge would write over its own input; "
            "choose another out_path"
        )
    for what, path in _inputs(config, model_dirs):
        entries = tree_entries(path) if os.path.isdir(path) else ()
        for name, full in entries:
            real = os.path.realpath(full)
            if any(within(real, mine) for mine in ours):
                raise ChainConfigError(
                    f"{what}: {name} is a symlink into out_path {shown}; an input may not "
                    "be read from the output being written"
                )


# Each expert's calibration as check_calibration tokenized it (and the pad id to batch it
# with), kept for the walk of the same merge (take_checked_calibration), which would
# otherwise load and tokenize it again. The key says what was read and how.
_CHECKED: Dict[tuple, Tuple[CalibrationSet, int]] = {}
# Under tokenizer_source, each expert's own chat template, for the walk to render its
# `messages` with (tokenized with the output tokenizer); None where it has none.
_OWN_TEMPLATES: Dict[ModelReference, Optional[str]] = {}


def _calibration_key(model, source, num_samples: int, max_seq_len: int, spec: RecordSpec,
                     chat_template: Optional[str]) -> tuple:
    return (model, str(source), num_samples, max_seq_len, spec, chat_template)


def take_checked_calibration(model, source, num_samples: int, max_seq_len: int, spec: RecordSpec,
                             chat_template: Optional[str]) -> Optional[Tuple[CalibrationSet, int]]:
    """What ``check_calibration`` loaded for ``model`` with these settings (and the pad id
    to batch it with), once; None if it did not. Only for data tokenized as the check
    does: with the model's own tokenizer (no tokenizer_source), its ``messages`` rendered
    with ``chat_template`` (the config's), or else the tokenizer's own."""
    key = _calibration_key(model, source, num_samples, max_seq_len, spec, chat_template)
    return _CHECKED.pop(key, None)


def own_chat_template(model) -> Optional[str]:
    """Under tokenizer_source: the chat template of ``model``'s own tokenizer, as the
    check found it (None: it has none, or its tokenizer did not load)."""
    return _OWN_TEMPLATES.get(model)


def pad_id(tokenizer, rows: Optional[int]) -> int:
    """The id padding positions hold: the tokenizer's pad token where the model has an
    embedding row for it, else 0. Padding is masked out of attention and statistics, so
    any row will do; a pad token added to the tokenizer but not to the model's
    embeddings would otherwise index past them."""
    pad = tokenizer.pad_token_id
    return pad if pad is not None and (rows is None or 0 <= pad < rows) else 0


def _embedding_rows(model, options) -> Optional[int]:
    config = model.config(trust_remote_code=options.trust_remote_code)
    rows = getattr(config, "vocab_size", None)
    return rows if isinstance(rows, int) and rows > 0 else None


def _check_token_ids(model, source, cal: CalibrationSet, tok, rows: Optional[int]) -> None:
    """Every token id of the expert's calibration has a row in its embeddings."""
    if rows is None:
        return
    top = max((max(seq) for seq in cal.sequences), default=-1)
    if top >= rows:
        token = tok.convert_ids_to_tokens(top)
        raise ChainConfigError(
            f"model {model}: its tokenizer turns calibration {source} into token id {top} "
            f"({token!r}), but the model has {rows} embedding rows (vocab_size in its "
            "config.json): the tokenizer has tokens the model lacks. Resize the model's "
            "embeddings to its tokenizer (model.resize_token_embeddings(len(tokenizer)), then "
            "save it), or set tokenizer_source: union"
        )


def check_calibration(experts, parameters, num_samples: int, max_seq_len: int, options,
                      shared_tokenizer: bool, chat_template: Optional[str] = None) -> None:
    """Every expert's calibration data loads and tokenizes (own tokenizer), its
    ``messages`` rendered with ``chat_template`` (the config's, resolved) or else the
    tokenizer's own, and every token has an embedding row.

    ``parameters``: each expert's resolved per-model parameters. Under tokenizer_source
    (``shared_tokenizer``) the walk tokenizes with the output tokenizer, so an expert
    whose own tokenizer does not load has only its records read here.
    """
    _CHECKED.clear()  # only the latest plan's: a process may plan several merges
    _OWN_TEMPLATES.clear()
    loaded = dict(_TOKENIZERS)
    _TOKENIZERS.clear()  # none kept beyond this plan's check
    for model in experts:
        source = parameters[model]["calibration"]  # present: see check_planned_values
        spec = RecordSpec.from_parameters(parameters[model])
        try:
            tok = loaded[model] if model in loaded else model_tokenizer(model, options)
        except CalibrationError as e:
            if not shared_tokenizer:
                raise ChainConfigError(f"{e}; add or fix the model's tokenizer files, or set "
                                       "tokenizer_source") from None
            load_labeled(source, num_samples, f"{source} (for model {model})", spec=spec,
                         max_seq_len=max_seq_len)
            continue
        if shared_tokenizer:
            _OWN_TEMPLATES[model] = getattr(tok, "chat_template", None) or None
        cal = load_calibration(source, tok, num_samples, max_seq_len, model=model, spec=spec,
                               chat_template=chat_template)
        if not shared_tokenizer:  # with tokenizer_source the walk tokenizes for the output's
            rows = _embedding_rows(model, options)
            _check_token_ids(model, source, cal, tok, rows)
            key = _calibration_key(model, source, num_samples, max_seq_len, spec, chat_template)
            _CHECKED[key] = (cal, pad_id(tok, rows))


SCAN_UNMAP_BYTES = 32 << 20


def scan_weights(models: List[ModelReference], options) -> None:
    """NaN or Inf anywhere in an input model stops the merge, naming the tensor."""
    from mergekit.io.tasks import LoaderCache

    cache = LoaderCache()
    for model in tqdm.tqdm(models, desc="Checking weights", disable=options.quiet):
        loader = cache.get(model)
        # shard by shard: a pickled shard is read whole each time the loader switches
        paths = loader.index.tensor_paths
        mapped = 0
        for name in sorted(paths, key=lambda n: (paths[n], n)):
            t = loader.get_tensor(name, device="cpu")
            # Unmap a safetensors file every few MB read: its touched pages would otherwise
            # stay resident and the check alone would hold a whole shard (pickled shards
            # are read whole anyway, so they are left open until the loader moves on).
            mapped += t.numel() * t.element_size()
            if mapped > SCAN_UNMAP_BYTES and paths[name].endswith(".safetensors"):
                loader.flush()
                mapped = 0
            if not t.is_floating_point():
                continue
            if not all_finite(t):
                finite = torch.isfinite(t)
                nan = int(torch.isnan(t).sum())
                inf = int((~finite).sum()) - nan
                what = " and ".join(f"{n} {k}" for n, k in ((nan, "NaN"), (inf, "Inf")) if n)
                raise ChainConfigError(
                    f"model {model}: tensor {name} holds {what} value(s); a merge would spread "
                    "them, so repair or re-export this model"
                )
        loader.flush()
