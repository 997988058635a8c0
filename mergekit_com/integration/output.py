"""Output-folder files CoM adds to what mergekit writes."""

from __future__ import annotations

import glob
import logging
import os
import shutil
from typing import Iterable

from mergekit.common import ModelReference

from mergekit_com.errors import ChainConfigError
from mergekit_com.integration.models import merged_reference

LOG = logging.getLogger("mergekit.chain_of_merges.output")

GENERATION_CONFIG = "generation_config.json"


def copy_generation_config(sources: Iterable[ModelReference], out_path: str, options) -> None:
    """The first input's ``generation_config.json`` (base model first).

    mergekit copies it only along with the tokenizer files, i.e. not with
    ``tokenizer_source``, ``chat_template`` or ``--no-copy-tokenizer``; the
    Hub and ``generate()`` read it, so the output always gets one when an
    input has one.
    """
    if os.path.exists(os.path.join(out_path, GENERATION_CONFIG)):
        return
    for ref in dict.fromkeys(sources):
        try:
            local = merged_reference(ref, options).local_path(cache_dir=options.transformers_cache)
        except (OSError, RuntimeError, ValueError, ChainConfigError) as e:  # no file to give
            LOG.debug("no local path for %s: %s", ref, e)
            continue
        path = os.path.join(local, GENERATION_CONFIG)
        if os.path.isfile(path):
            LOG.info("Copying %s from %s", GENERATION_CONFIG, ref)
            shutil.copy(path, os.path.join(out_path, GENERATION_CONFIG))
            return


def copy_remote_code(source: ModelReference, out_path: str, options) -> None:
    """The Python modules of a ``trust_remote_code`` model, so the output loads too.

    ``config.save_pretrained`` copies only the configuration's module; the
    modeling code (and whatever it imports relatively) lives next to it.
    """
    if not getattr(source.config(trust_remote_code=options.trust_remote_code), "auto_map", None):
        return
    local = merged_reference(source, options).local_path(cache_dir=options.transformers_cache)
    for path in glob.glob(os.path.join(local, "*.py")):
        target = os.path.join(out_path, os.path.basename(path))
        if not os.path.exists(target):
            LOG.info("Copying %s from %s", os.path.basename(path), source)
            shutil.copy(path, target)
