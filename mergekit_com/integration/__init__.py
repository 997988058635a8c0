"""The only layer below the entry points (``cli.py``, the package itself) that imports
mergekit: the method's declaration, the planner route, the chain task that runs the
walk on mergekit's loaders and writer, the staged ``run_merge``, the model card, the
checks before any work, and the start-up hook. Importing this package itself imports nothing (the start-up
hook must stay cheap).
"""
