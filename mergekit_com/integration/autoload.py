"""Make ``chain_of_merges`` known to mergekit without importing mergekit early.

mergekit 0.1.5 has no plugin discovery. A one-line ``.pth`` file (installed
as ``mergekit_com_autoload.pth``) calls ``install_from_pth`` at interpreter
start-up; that only puts a tiny finder on ``sys.meta_path``. When, and only
when, a program imports ``mergekit.merge_methods``, ``mergekit.plan``,
``mergekit.merge`` or ``mergekit-multi``'s module, the finder lets the import finish
and then registers the method / routes the planner / routes ``run_merge`` (staged
output, resume) / checks every stage first: see ``patches.py``. Set ``MERGEKIT_COM_AUTOLOAD=0`` to switch it off (then
``import mergekit_com`` registers explicitly).
"""

import sys

_WATCHED = ("mergekit.merge_methods", "mergekit.plan", "mergekit.merge", "mergekit.scripts.multimerge")


def _after_import(name: str) -> None:
    from mergekit_com.integration import patches

    if name == "mergekit.merge_methods":
        patches.register_method()
    elif name == "mergekit.plan":
        patches.route_planner()
    elif name == "mergekit.merge":
        patches.route_run_merge()
    elif name == "mergekit.scripts.multimerge":
        patches.check_stages_first()


class _PostImportFinder:
    """Wraps the real loader of the watched modules to run a hook afterwards."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        real_exec = loader.exec_module

        class _Loader:
            def __getattr__(self, attr):
                return getattr(loader, attr)

            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                real_exec(module)
                _after_import(fullname)

        spec.loader = _Loader()
        return spec


_FINDER = _PostImportFinder()


def install() -> None:
    """Hook now for modules already imported, later for the others."""
    for name in _WATCHED:
        if name in sys.modules:
            _after_import(name)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def install_from_pth() -> None:
    install()
