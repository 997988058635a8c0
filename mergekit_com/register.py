"""Making the method and the planner route known to mergekit (idempotent).

Each module below registers itself when its import finishes, so a hook that
fires while one of them is still mid-import (it imported mergekit first)
simply leaves the work to that module.
"""

import importlib
import sys


def _finish(module_name: str, ready_attr: str, action: str) -> None:
    module = sys.modules.get(module_name)
    if module is None:
        importlib.import_module(module_name)  # registers at the end of its import
    elif hasattr(module, ready_attr):
        getattr(module, action)()


def register_method() -> None:
    _finish("mergekit_com.method", "chain_of_merges", "register")


def route_planner() -> None:
    _finish("mergekit_com.adapter", "patch_planner", "patch_planner")


def patch_run_merge() -> None:
    _finish("mergekit_com.staged_merge", "patch_run_merge", "patch_run_merge")
