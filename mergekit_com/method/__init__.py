"""Chain of Merges itself, free of mergekit.

Read in this order: ``parameters.py`` (every knob), ``linalg.py`` (the
closed form), ``strategies.py`` (chains and objectives), ``layer.py`` (one
layer's merge), ``walk.py`` (the walk over the model), ``ports.py`` (what
the walk needs from outside). ``integration/`` connects it to mergekit.
"""
