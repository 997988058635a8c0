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
import gc
import logging
import os
import tempfile
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional

from mergekit_com.errors import CalibrationError, ChainConfigError, listed
from mergekit_com.integration import card, mergekit_internals, preflight
from mergekit_com.integration.chain_task import walk_device
from mergekit_com.integration.config_views import calibration_sources
from mergekit_com.integration.output_errors import output_errors, stop_signals
from mergekit_com.integration.validation import check_config, check_config_keys, check_options
from mergekit_com.io.calibration import check_source
from mergekit_com.io.datasets_source import is_dataset, source_stamp
from mergekit_com.io.fingerprint import large_file_times, model_fingerprint, sha256_json
from mergekit_com.io.publish import PublishBlocked
from mergekit_com.io.workdir import FORMAT, WorkDir
from mergekit_com.method import allocator, distributed
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


def _validated_stamp(source: str) -> Optional[str]:
    """A local calibration file is checked before it is read (hashed); the planner
    reports a bad one. Hub datasets and their downloaded folders: ``source_stamp``."""
    if not is_dataset(source):
        try:
            check_source(source)
        except CalibrationError:
            return None
    return source_stamp(source)


def fingerprint(config, options, model_dirs: Dict[Any, str]) -> Dict[str, Any]:
    """Everything the result depends on: a resume with anything changed is refused."""
    relevant = {k: getattr(options, k) for k in (
        "device", "lora_merge_dtype", "unsafe_truncate_embeddings", "allow_crimes")}
    return {
        "format": FORMAT,
        "package": __version__,
        "config": sha256_json(config.model_dump(mode="json")),
        "options": sha256_json(relevant),
        "models": {str(m): model_fingerprint(p) for m, p in model_dirs.items()},
        "times": {str(m): large_file_times(p) for m, p in model_dirs.items()},
        "calibration": {c: _validated_stamp(c) for c in calibration_sources(config)},
    }


def _check_out_path_contents(work: WorkDir) -> None:
    """Someone else's files in out_path stay as they are, or the merge does not start."""
    blocking = work.blocking_files()
    if blocking:
        raise ChainConfigError(
            f"out_path {work.shown} holds files that mergekit-com did not write (or that "
            f"changed since it did), which the merged model would replace or load with: "
            f"{listed(blocking)}; move them away or choose another out_path"
        )
    others = work.other_files()
    if others:
        LOG.warning("out_path %s also holds %s; the merge leaves them as they are",
                    work.shown, listed(others))


class _HideMergekitDeprecation(logging.Filter):
    """mergekit sets ``config.torch_dtype``; transformers 5 warns about it on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`torch_dtype` is deprecated" not in record.getMessage()


@contextmanager
def long_lived_objects_frozen() -> Iterator[None]:
    """Leave the objects alive before the merge (torch, transformers, mergekit: about a
    million) out of the garbage collector's full passes while it runs. One full pass over
    them took 0.27 s, a quarter of a merge of the tiny zoo (whether one falls inside a
    merge depends on allocation counts: one took 0.24 s of mergekit's own `linear` there,
    which the benchmark therefore times frozen too). They are unfrozen afterwards, so garbage
    from before the merge is still collected; a process that froze objects itself is
    left as it is."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def run_chain_merge(run_merge, merge_config, out_path: str, options, config_source=None) -> None:
    """``run_merge``: mergekit's own, called on the staging directory."""
    allocator.tune_malloc()  # before the checks: they load the models' configs and tokenizers
    noise = logging.getLogger("transformers.configuration_utils")
    hide = _HideMergekitDeprecation()
    noise.addFilter(hide)
    try:
        with stop_signals(), long_lived_objects_frozen(), mergekit_internals.configs_read_once(), \
                mergekit_internals.referenced_models_in_order():
            _run_chain_merge(run_merge, merge_config, out_path, options, config_source)
    finally:
        noise.removeFilter(hide)


def _run_chain_merge(run_merge, merge_config, out_path: str, options, config_source) -> None:
    if os.path.islink(out_path) and not os.path.exists(out_path):
        raise ChainConfigError(f"out_path {out_path} is a symlink to {os.readlink(out_path)}, which "
                               "does not exist; create that folder, or choose another out_path")
    if os.path.lexists(out_path) and not os.path.isdir(out_path):
        raise ChainConfigError(f"out_path {out_path} exists and is not a directory")
    above = os.path.dirname(out_path.rstrip(os.sep)) or "."
    while not os.path.lexists(above):  # the nearest existing folder above, as the user wrote it
        above = os.path.dirname(above) or "."
    if not os.path.isdir(above):
        raise ChainConfigError(
            f"out_path {out_path} cannot be made: {above} is a file, not a directory; "
            "choose another out_path")
    check_config_keys(config_source)
    check_config(merge_config)
    check_options(options)
    work = WorkDir(out_path)
    preflight.check_lora_cache(options, work)
    model_dirs = preflight.check_models(merge_config, options)
    preflight.check_out_path(work.shown, [work.target, work.path], merge_config, model_dirs)
    if not distributed.is_writer():  # under torchrun: rank 0 writes
        work.open(fingerprint(merge_config, options, model_dirs), RESUME_ONLY.get(), create=False)
        _run_other_rank(run_merge, merge_config, work, options, config_source)
        return
    parent = os.path.dirname(work.path)
    created = _first_missing(parent)
    try:
        with output_errors(work) as progress:
            os.makedirs(parent, exist_ok=True)
            with work.lock():  # a second merge into out_path stops here, touching nothing
                work.recover()  # a publish a kill interrupted: finished or undone first
                _check_out_path_contents(work)
                work.open(fingerprint(merge_config, options, model_dirs), resume_only=RESUME_ONLY.get())
                progress.work = work
                _merge_and_publish(run_merge, merge_config, work, options, config_source)
    except BaseException:
        if created is not None:  # the folders made for out_path, unless a resumable merge is in them
            _remove_empty_folders(parent, created)
        raise


def _first_missing(path: str) -> Optional[str]:
    """The outermost folder on the way to ``path`` that does not exist yet (None: it exists)."""
    missing = None
    while not os.path.lexists(path):
        missing, path = path, os.path.dirname(path)
    return missing


def _remove_empty_folders(path: str, top: str) -> None:
    """Remove ``path`` and its parents up to ``top`` while they are empty."""
    while True:
        try:
            os.rmdir(path)
        except OSError:
            return  # not empty (or gone): what is in it is kept
        if path == top:
            return
        path = os.path.dirname(path)


# mergekit's options that change only the files written, not a tensor: a finished merge
# written with others is written again from its layer checkpoints
OUTPUT_OPTIONS = ("out_shard_size", "safe_serialization", "copy_tokenizer", "write_model_card")


def _merge_and_publish(run_merge, merge_config, work: WorkDir, options, config_source) -> None:
    told = []

    def tell(builds: bool) -> None:
        """Under torchrun the other ranks walk with this one, or leave it to publish."""
        if distributed.launched() and not told:
            told.append(builds)
            device = walk_device(options)
            distributed.setup(device)
            distributed.from_writer(builds, device)

    def build() -> None:
        tell(True)
        _staged(run_merge, merge_config, work, work.staged, options, config_source)

    try:
        work.complete_and_publish(build, written_with={k: getattr(options, k) for k in OUTPUT_OPTIONS})
        tell(False)  # a finished merge, published without a walk
    except PublishBlocked as e:
        raise ChainConfigError(
            f"out_path {work.shown} now holds {listed(e.names)}, which mergekit-com did not "
            f"write; move them away and run the same command again to publish the finished "
            f"merge kept in {work.path}"
        ) from None


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
    device = walk_device(options)
    distributed.setup(device)
    if not distributed.from_writer(True, device):
        return  # rank 0 publishes a merge that is finished already
    parent = os.path.dirname(work.path)
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".com-rank-", dir=parent) as scratch:
        _staged(run_merge, merge_config, work, os.path.join(scratch, os.path.basename(work.out_path)),
                options, config_source)
