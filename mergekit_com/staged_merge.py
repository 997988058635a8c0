"""mergekit's ``run_merge`` for chain_of_merges: checks first, staged output, resume.

mergekit's ``run_merge`` writes the tensors, then the config, model card and
tokenizer into ``out_path``. For chain_of_merges configs it is called on a
staging directory inside the work directory (see ``workdir.py``) and the
result is renamed to ``out_path`` only once complete, so an interrupted or
failed merge never leaves a partial model there. Every other merge method
goes to mergekit's ``run_merge`` unchanged.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import os
import sys
import tempfile

from mergekit_com import distributed
from mergekit_com.adapter import check_options, check_parameter_names
from mergekit_com.errors import ChainConfigError
from mergekit_com.method import METHOD_NAME
from mergekit_com.workdir import ACTIVE, WorkDir, fingerprint

LOG = logging.getLogger(__name__)

# Set by ``mergekit-com --resume``: continue an interrupted merge, never start one.
RESUME_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "mergekit_com_resume_only", default=False
)


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


def run_chain_merge(original, merge_config, out_path: str, options, config_source=None) -> None:
    noise = logging.getLogger("transformers.configuration_utils")
    hide = _HideMergekitDeprecation()
    noise.addFilter(hide)
    try:
        _run_chain_merge(original, merge_config, out_path, options, config_source)
    finally:
        noise.removeFilter(hide)


def _run_chain_merge(original, merge_config, out_path: str, options, config_source) -> None:
    from mergekit_com import preflight

    if os.path.exists(out_path) and not os.path.isdir(out_path):
        raise ChainConfigError(f"out_path {out_path} exists and is not a directory")
    check_parameter_names(merge_config)
    check_options(options)
    model_dirs = preflight.check_models(merge_config, options)
    writer = distributed.is_writer()  # under torchrun: rank 0
    work = WorkDir(out_path).open(fingerprint(merge_config, options, model_dirs),
                                  resume_only=RESUME_ONLY.get(), create=writer)
    if not writer:
        _run_other_rank(original, merge_config, work, options, config_source)
        return
    _warn_if_not_empty(out_path)
    try:
        if not work.is_complete():
            work.discard_staged_output()
            token = ACTIVE.set(work)
            try:
                original(merge_config, work.staged, options, config_source=config_source)
            finally:
                ACTIVE.reset(token)
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


def _run_other_rank(original, merge_config, work: WorkDir, options, config_source) -> None:
    """Ranks other than 0 read rank 0's checkpoints and write nothing that is kept.

    mergekit's run_merge still writes config, card and tokenizer on every rank;
    here into a scratch directory, so that only rank 0 touches the output.
    """
    parent = os.path.dirname(work.path)
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".com-rank-", dir=parent) as scratch:
        token = ACTIVE.set(work)
        try:
            original(merge_config, os.path.join(scratch, os.path.basename(work.out_path)),
                     options, config_source=config_source)
        finally:
            ACTIVE.reset(token)


def patch_run_merge() -> None:
    """Route chain_of_merges through ``run_chain_merge``; other methods untouched."""
    import mergekit.merge as merge_module

    if getattr(merge_module.run_merge, "_mergekit_com", False):
        return
    original = merge_module.run_merge

    @functools.wraps(original)
    def run_merge(merge_config, out_path, options, config_source=None):
        if merge_config.merge_method != METHOD_NAME:
            return original(merge_config, out_path, options, config_source=config_source)
        return run_chain_merge(original, merge_config, out_path, options, config_source)

    run_merge._mergekit_com = True
    merge_module.run_merge = run_merge
    # A command module imported before us holds its own reference.
    for name in ("mergekit.scripts.run_yaml",):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "run_merge", None) is original:
            module.run_merge = run_merge


patch_run_merge()
