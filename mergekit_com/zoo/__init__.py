"""Expert zoo: a base model, per-task experts and a multi-task model, built offline.

    from mergekit_com.zoo import build_zoo
    zoo = build_zoo("tiny", "zoo_cache/tiny")   # cached after the first build
    zoo.base, zoo.experts["reverse"], zoo.data_file("reverse", "calib")
"""

from .build import ZooManifest, build_zoo
from .presets import PRESETS, ZooPreset, get_preset
from .tasks import TASKS

__all__ = ["PRESETS", "TASKS", "ZooManifest", "ZooPreset", "build_zoo", "get_preset"]
