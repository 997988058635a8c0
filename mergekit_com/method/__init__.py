"""Chain of Merges itself, free of mergekit.

Read in this order: ``parameters.py`` (every knob), ``linalg.py`` (the
closed form), ``statistics.py`` (the moments of one shared input),
``strategies.py`` (chains and objectives), ``layer.py`` (one layer's merge),
``head.py`` (the tensors after the layers), ``walk.py`` (the walk over the
model), ``ports.py`` (what the walk needs from outside). ``integration/``
connects it to mergekit.
"""
