"""Run one merge through mergekit's real ``mergekit-yaml`` command in a child
process and measure it: wall time and peak memory of that process alone.

The child is ``python -m mergekit_com.bench.measure STATS -- <mergekit-yaml args>``:
it runs mergekit's own click command in-process, then records its peak RSS
(``getrusage``) and, when CUDA was used, the peak GPU memory, so every method
is measured the same way and the parent's memory never pollutes the figure.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import yaml

from ..io.workdir import WorkDir
from ..method.allocator import tune_malloc


@dataclass
class Measurement:
    wall_s: float  # the whole child process, interpreter start included
    merge_s: float  # inside the child: mergekit's command alone
    peak_rss_mb: float
    peak_gpu_mb: Optional[float] = None
    phases: Optional[dict] = None  # chain_of_merges only: seconds per phase of the walk

    def to_json(self) -> dict:
        return asdict(self)


class MergeFailed(RuntimeError):
    pass


def run_yaml(config: dict, out: Path, args: Sequence[str] = (), env: Optional[dict] = None) -> Measurement:
    """Write `config` to a file, merge it into `out` with mergekit-yaml, measure the child.

    A fresh merge every time: the work directory an interrupted benchmark left next to
    `out` (io.workdir) would otherwise be resumed, or refused if the models changed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(WorkDir(str(out)).path, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "config.yml"
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        stats = Path(tmp) / "stats.json"
        cmd = [sys.executable, "-m", "mergekit_com.bench.measure", str(stats), "--",
               str(cfg_path), str(out), *args]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise MergeFailed(f"mergekit-yaml failed for {out.name}: " + " | ".join(tail))
        inner = json.loads(stats.read_text())
    return Measurement(wall_s=wall, **inner)


def _child(argv: List[str]) -> None:
    stats, sep, *yaml_args = argv
    assert sep == "--", "usage: python -m mergekit_com.bench.measure STATS -- CONFIG OUT [flags]"
    from mergekit.scripts.run_yaml import main as run_yaml_cmd

    import mergekit_com  # noqa: F401  (chain_of_merges available even with autoload off)
    from mergekit_com.method.timing import PHASES

    # mergekit's own merge methods were imported with its command, above; ours load on
    # first use (so that the autoload every Python start runs stays cheap). Import them
    # before the clock too when this merge uses them, so that every method is timed alike
    # (only then: more live objects would slow the garbage collector's passes in others).
    ours = (yaml.safe_load(Path(yaml_args[0]).read_text()) or {}).get("merge_method") == "chain_of_merges"
    if ours:
        import mergekit_com.integration.chain_task  # noqa: F401
        import mergekit_com.integration.planner  # noqa: F401
        import mergekit_com.integration.staged_merge  # noqa: F401

    if os.environ.get("MERGEKIT_COM_BENCH_NAIVE") == "1":
        from .naive import install

        install()  # the benchmark's reference: re-run the merged prefix for every layer

    # The objects alive now (the imports: about a million) are left out of the garbage
    # collector's full passes, for every method: whether one falls inside a merge is luck
    # of allocation counts (a pass took 0.24 s of mergekit's 0.05 s `linear` on the tiny
    # zoo). Our merges freeze them themselves (staged_merge.long_lived_objects_frozen), as
    # a user's run does: freezing them here too would time its check for objects frozen
    # by the caller, which counts them one by one (44 ms of a 0.6 s merge of the tiny zoo).
    gc.collect()
    if not ours:
        gc.freeze()
    # Our merges set glibc's malloc thresholds (method/allocator.py); every method runs with
    # them, so that the fewer page faults are not counted as ours alone.
    tune_malloc()
    start = time.perf_counter()
    run_yaml_cmd.main(args=yaml_args, prog_name="mergekit-yaml", standalone_mode=False)
    merge_s = time.perf_counter() - start
    peak_gpu = None
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            peak_gpu = torch.cuda.max_memory_allocated() / 2**20
    # ru_maxrss is in KiB on Linux
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(stats).write_text(json.dumps({"merge_s": merge_s, "peak_rss_mb": rss, "peak_gpu_mb": peak_gpu,
                                       "phases": dict(PHASES.seconds) or None}))


if __name__ == "__main__":
    _child(sys.argv[1:])
