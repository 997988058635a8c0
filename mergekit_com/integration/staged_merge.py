"""mergekit's ``run_merge`` for chain_of_merges: checks first, staged output, resume, card.

mergekit's ``run_merge`` writes the tensors, then the config, model card and
tokenizer into ``out_path``. For chain_of_merges configs it is called on a
staging directory inside the work directory (``io/workdir.py``), and the
result is renamed to ``out_path`` only once complete, so an interrupted or
failed merge never leaves a partial model there. The model card is written
here, with mergekit's public ``generate_card``, once the merge report exists.
Every other merge method goes to mergekit's ``run_merge`` unchanged
(``patches.py`` routes them).
"""

from __future__ import annotations

import contextvars
import logging
import os
import tempfile
from typing import Any, Dict, Optional

from mergekit_com.errors import ChainConfigError
from mergekit_com.integration import card, preflight
from mergekit_com.integration.config_views import calibration_sources
from mergekit_com.integration.validation import check_options, check_parameter_names
from mergekit_com.io.workdir import (
    FORMAT,
    WorkDir,
    data_sha256,
    model_stamp,
    sha256_json,
)
from mergekit_com.method import distributed
from mergekit_com.version import __version__

LOG = logging.getLogger(__name__)

# Set by ``mergekit-com --resume``: continue an interrupted merge, never start one.
RESUME_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "mergekit_com_resume_only", default=False
)
# The work directory of the run_merge in progress, for the planner (its checkpoints).
ACTIVE: contextvars.ContextVar[Optional[WorkDir]] = contextvars.ContextVar(
    "mergekit_com_work_dir", default=None
)


def fingerprint(config, options, model_dirs: Dict[Any, str]) -> Dict[str, Any]:
    """Everything the result depends on: a resume with anything changed is refused."""
    relevant = {k: getattr(options, k) for k in (
        "device", "lora_merge_dtype", "unsafe_truncate_embeddings", "allow_crimes")}
    return {
        "format": FORMAT,
        "package": __version__,
        "config": sha256_json(config.model_dump(mode="json")),
        "options": sha256_json(relevant),
        "models": {str(m): model_stamp(p) for m, p in model_dirs.items()},
        "calibration": {c: data_sha256(c) for c in calibration_sources(config)},
    }


def _warn_if_not_empty(out_path: str) -> None:
    if os.path.isdir(out_path) and os.listdir(out_path):
        LOG.warning(
            "out_path %s already exists and is not empty: as with mergekit-yaml, the merged "
            "model's files will replace those with the same names and the others stay; "
            "nothing there changes until the merge is complete", out_path,
        )


class _HideMergekitDeprecation(logging.Filter):
    """mergekit sets ``config.torch_dtype``; transformers 5 warns about it on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`torch_dtype` is deprecated" not in record.getMessage()


def run_chain_merge(run_merge, merge_config, out_path: str, options, config_source=None) -> None:
    """``run_merge``: mergekit's own, called on the staging directory."""
    noise = logging.getLogger("transformers.configuration_utils")
    hide = _HideMergekitDeprecation()
    noise.addFilter(hide)
    try:
        _run_chain_merge(run_merge, merge_config, out_path, options, config_source)
    finally:
        noise.removeFilter(hide)


def _run_chain_merge(run_merge, merge_config, out_path: str, options, config_source) -> None:
    if os.path.exists(out_path) and not os.path.isdir(out_path):
        raise ChainConfigError(f"out_path {out_path} exists and is not a directory")
    check_parameter_names(merge_config)
    check_options(options)
    model_dirs = preflight.check_models(merge_config, options)
    writer = distributed.is_writer()  # under torchrun: rank 0
    work = WorkDir(out_path).open(fingerprint(merge_config, options, model_dirs),
                                  resume_only=RESUME_ONLY.get(), create=writer)
    if not writer:
        _run_other_rank(run_merge, merge_config, work, options, config_source)
        return
    _warn_if_not_empty(out_path)
    try:
        if not work.is_complete():
            work.discard_staged_output()
            _staged(run_merge, merge_config, work, work.staged, options, config_source)
            work.mark_complete()
        work.publish()
    except BaseException:
        done = work.checkpoints.completed_layers()
        if work.is_complete() or done:
            LOG.warning(
                "merge stopped; %s holds its progress (%s): run the same command again "
                "(mergekit-com: add --resume) to continue", work.path,
                "complete" if work.is_complete() else f"{done} layer(s) merged",
            )
        else:
            work.remove()  # nothing worth keeping
        raise
    work.remove()


def _staged(run_merge, merge_config, work: WorkDir, out_dir: str, options, config_source) -> None:
    """mergekit's run_merge into ``out_dir`` with our card in place of its own."""
    token = ACTIVE.set(work)
    try:
        run_merge(merge_config, out_dir, options.model_copy(update={"write_model_card": False}),
                  config_source=config_source)
    finally:
        ACTIVE.reset(token)
    if options.write_model_card and distributed.is_writer():
        # as mergekit does: the config it planned (normalised in place) and its YAML
        card.write_card(merge_config, config_source or merge_config.to_yaml(), out_dir)


def _run_other_rank(run_merge, merge_config, work: WorkDir, options, config_source) -> None:
    """Ranks other than 0 read rank 0's checkpoints and write nothing that is kept.

    mergekit's run_merge still writes config and tokenizer on every rank;
    here into a scratch directory, so that only rank 0 touches the output.
    """
    parent = os.path.dirname(work.path)
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".com-rank-", dir=parent) as scratch:
        _staged(run_merge, merge_config, work, os.path.join(scratch, os.path.basename(work.out_path)),
                options, config_source)
