"""The private mergekit names this package uses, and the mergekit names it swaps for
a moment, each with the reason.

Everything else goes through mergekit's public API (its planner's tasks,
``Executor.run``, ``SaveTensor``, ``generate_card``, the method registry);
the lasting patches are in ``patches.py``. Check both first when mergekit changes.
"""

from __future__ import annotations

import contextlib
import copy
import types
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple


def resolve_chat_template(chat_template: Optional[str], referenced: Sequence,
                          trust_remote_code: bool) -> Optional[str]:
    """The template mergekit will give the output tokenizer (named, literal or auto)."""
    if not chat_template:
        return None
    # private: mergekit's own rules (named template, literal text, or `auto`: the
    # plurality of the inputs' templates), so `messages` calibration records are
    # rendered with exactly the template the output tokenizer will get
    from mergekit.merge import _set_chat_template

    holder = types.SimpleNamespace(chat_template=None)
    config = types.SimpleNamespace(chat_template=chat_template,
                                   referenced_models=lambda: list(referenced))
    _set_chat_template(holder, config, trust_remote_code=trust_remote_code)
    return holder.chat_template


def chat_template_names() -> List[str]:
    """The names of mergekit's own chat templates (``chat_template: chatml``, ...)."""
    import importlib.resources

    # private: the folder mergekit.merge reads its named templates from
    from mergekit._data import chat_templates

    return sorted(p.name[:-len(".jinja")] for p in importlib.resources.files(chat_templates).iterdir()
                  if p.name.endswith(".jinja"))


@contextlib.contextmanager
def _swapped(owner, name: str, value) -> Iterator[None]:
    """``owner.name`` is ``value`` inside the block; the original is back after it."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextlib.contextmanager
def card_hub_check(is_hub: Callable[[str], bool]) -> Iterator[None]:
    """``mergekit.card.is_hf`` is ``is_hub`` inside the block: mergekit's own asks the Hub
    about local folders named like ``dir/model``, which fails offline after the merge."""
    import mergekit.card as mergekit_card

    with _swapped(mergekit_card, "is_hf", is_hub):
        yield


@contextlib.contextmanager
def referenced_models_in_order() -> Iterator[None]:
    """Inside the block, ``MergeConfiguration.referenced_models`` lists the base model
    first, then the models in the order the config lists them. mergekit builds the list
    from a set, so without a base the model it takes the output's config.json and its
    tag-along files from (the first) changed with ``PYTHONHASHSEED``, and with it the
    architecture the chain walks. The model card, written inside it, lists them so too."""
    from mergekit.config import MergeConfiguration

    from mergekit_com.integration.config_views import in_config_order

    original = MergeConfiguration.referenced_models

    def referenced_models(self):
        return in_config_order(self, original(self))

    with _swapped(MergeConfiguration, "referenced_models", referenced_models):
        yield


@contextlib.contextmanager
def configs_read_once() -> Iterator[None]:
    """Inside the block, ``ModelReference.config`` reads each model's configuration once
    and hands out copies (callers change what they get). A merge asked for them about 25
    times, mostly in mergekit's planner, at 0.7 ms a read (about half of it transformers
    formatting the configuration for a log line); a copy takes 0.02 ms."""
    from mergekit.common import ModelReference

    original = ModelReference.config
    read: Dict[Tuple[ModelReference, bool], object] = {}

    def config(self, trust_remote_code: bool = False):
        key = (self, bool(trust_remote_code))
        if key not in read:
            read[key] = original(self, trust_remote_code)
        return copy.deepcopy(read[key])

    with _swapped(ModelReference, "config", config):
        yield
