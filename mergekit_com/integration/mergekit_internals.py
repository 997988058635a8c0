"""The private mergekit names this package uses, and the one mergekit name it swaps
for a moment, each with the reason.

Everything else goes through mergekit's public API (its planner's tasks,
``Executor.run``, ``SaveTensor``, ``generate_card``, the method registry);
the lasting patches are in ``patches.py``. Check both first when mergekit changes.
"""

from __future__ import annotations

import contextlib
import types
from typing import Callable, Iterator, Optional, Sequence


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


@contextlib.contextmanager
def card_hub_check(is_hub: Callable[[str], bool]) -> Iterator[None]:
    """``mergekit.card.is_hf`` is ``is_hub`` inside the block: mergekit's own asks the Hub
    about local folders named like ``dir/model``, which fails offline after the merge."""
    import mergekit.card as mergekit_card

    original = mergekit_card.is_hf
    mergekit_card.is_hf = is_hub
    try:
        yield
    finally:
        mergekit_card.is_hf = original
