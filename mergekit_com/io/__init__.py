"""Files CoM reads and writes that need no mergekit: calibration data, the merge
report, the work directory (staged output and layer checkpoints)."""
