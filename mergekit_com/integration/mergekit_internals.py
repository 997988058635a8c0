"""The private mergekit names this package uses, each with the reason.

Everything else goes through mergekit's public API (its planner's tasks,
``Executor.run``, ``SaveTensor``, ``generate_card``, the method registry);
the patches are in ``patches.py``. Check these first when mergekit changes.
"""

from __future__ import annotations

import types
from typing import Optional, Sequence


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
