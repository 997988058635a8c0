"""Every change this package makes to mergekit, in one place.

mergekit 0.1.5 has no plugin discovery and no hook around planning or
``run_merge``, so:
  * ``register_method`` adds ``chain_of_merges`` through the public registry;
  * ``route_planner`` wraps ``MergePlanner.plan_to_disk``: chain_of_merges
    plans become one chain task (``planner.py``); other methods untouched;
  * ``route_run_merge`` wraps ``mergekit.merge.run_merge`` (and the reference
    ``mergekit.scripts.run_yaml`` took at import): chain_of_merges configs
    get checks, staged output and resume (``staged_merge.py``); an unknown
    method name gets a did-you-mean instead of mergekit's traceback;
  * ``check_stages_first`` wraps ``mergekit-multi``'s ``make_tasks``: every
    chain_of_merges stage's configuration is checked before any stage runs;
Each wrapper is idempotent, marks itself with ``_mergekit_com``, and imports
what it routes to only when called (this module is imported by the start-up
hook while mergekit is still importing). The private mergekit names used are
in ``mergekit_internals.py``, with the changes that last a single call (this
module imports what imports them): ``mergekit.card.is_hf`` while our card is
generated (``card.py``), ``ModelReference.config``, which reads each
configuration once, and ``MergeConfiguration.referenced_models``, which lists
them in config order, during a chain merge (``staged_merge.py``).
"""

from __future__ import annotations

import functools
import importlib
import sys

from mergekit_com.method.parameters import METHOD_NAME


def register_method() -> None:
    module = sys.modules.get("mergekit_com.integration.method")
    if module is None:
        importlib.import_module("mergekit_com.integration.method")  # registers when imported
    elif hasattr(module, "chain_of_merges"):
        module.register()
    # else it is being imported right now, and registers itself at the end


def route_planner() -> None:
    from mergekit.plan import MergePlanner

    original = MergePlanner.plan_to_disk
    if getattr(original, "_mergekit_com", False):
        return

    @functools.wraps(original)
    def plan_to_disk(self: MergePlanner, out_path: str):
        if self.config.merge_method != METHOD_NAME:
            return original(self, out_path)
        from mergekit_com.integration.planner import plan_chain

        return plan_chain(self, out_path, original)

    plan_to_disk._mergekit_com = True
    MergePlanner.plan_to_disk = plan_to_disk


def route_run_merge() -> None:
    import mergekit.merge as merge_module

    original = merge_module.run_merge
    if getattr(original, "_mergekit_com", False):
        return

    @functools.wraps(original)
    def run_merge(merge_config, out_path, options, config_source=None):
        if merge_config.merge_method != METHOD_NAME:
            from mergekit_com.integration.validation import check_merge_method

            check_merge_method(merge_config.merge_method)  # a typo: one line, not a traceback
            return original(merge_config, out_path, options, config_source=config_source)
        from mergekit_com.integration.staged_merge import run_chain_merge

        return run_chain_merge(original, merge_config, out_path, options, config_source)

    run_merge._mergekit_com = True
    merge_module.run_merge = run_merge
    # A command module imported before us holds its own reference.
    module = sys.modules.get("mergekit.scripts.run_yaml")
    if module is not None and getattr(module, "run_merge", None) is original:
        module.run_merge = run_merge


def check_stages_first() -> None:
    """``mergekit-multi``: every chain_of_merges stage's configuration is checked before
    the first stage runs (a typo in the last one would otherwise stop it after the others)."""
    import mergekit.scripts.multimerge as multimerge

    original = multimerge.make_tasks
    if getattr(original, "_mergekit_com", False):
        return

    @functools.wraps(original)
    def make_tasks(merge_configs, *args, **kwargs):
        from mergekit_com.integration.validation import check_stages

        check_stages(merge_configs)
        return original(merge_configs, *args, **kwargs)

    make_tasks._mergekit_com = True
    multimerge.make_tasks = make_tasks
