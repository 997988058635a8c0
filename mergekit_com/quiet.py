"""Quiet by default: what ``make demo`` and ``python -m mergekit_com.evaluate`` print is theirs.

transformers draws a "Loading weights" bar for every model it loads and warns,
on every in-process mergekit merge, that the ``torch_dtype`` key mergekit sets
is deprecated; huggingface_hub and datasets draw download and conversion bars.
None of that is the tool's progress, so it is hidden unless ``-v``.
"""

from __future__ import annotations

import logging
import os


def quiet_libraries(verbose: bool = False) -> None:
    """Hide the libraries' bars and warnings (all of it shown with ``verbose``); keep our logs."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("mergekit_com").setLevel(logging.INFO)  # our own status lines
    if verbose:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # for child processes too
    import datasets
    import huggingface_hub
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()  # the torch_dtype deprecation is a warning
    huggingface_hub.utils.disable_progress_bars()
    datasets.disable_progress_bars()
    # lm-eval (the evaluator's lm-eval backend): its warnings, and its progress bars with them
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
