"""One huge calibration record costs no more memory than a normal one.

Only ``record_budget(max_seq_len)`` characters of a record can reach the
model, so a record of hundreds of MB is read in chunks and cut as it is
read. Measured as the peak RSS of a whole merge in a child process, with
and without one 256 MB record in an expert's calibration file
(docs/errors.md quotes the numbers; ``python -m tests.e2e.test_big_record
MB`` measures them for another size).
"""

import json
import os
import subprocess
import sys
import textwrap

import yaml

from tests.support.merging import com_config, experts

CHILD = textwrap.dedent("""
    import resource, sys
    from mergekit_com.cli import main
    try:
        main(sys.argv[1:])
    finally:
        print("peak_rss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
""")


def write_data(path: str, normal: str, huge_mb: int) -> str:
    with open(path, "w") as out:
        if huge_mb:
            out.write('{"text": "')
            block = "calibration text " * (1 << 12)
            for _ in range(huge_mb * (1 << 20) // len(block)):
                out.write(block)
            out.write('"}\n')
        out.write(open(normal).read())
    return path


def peak_rss_mb(zoo, root: str, huge_mb: int) -> float:
    data = write_data(os.path.join(root, f"e1-{huge_mb}.jsonl"), zoo["expert1_data"], huge_mb)
    models = experts(zoo)
    models[1]["calibration"] = data
    config = os.path.join(root, f"com-{huge_mb}.yml")
    with open(config, "w") as fp:
        yaml.safe_dump(com_config(models, num_samples=13, max_seq_len=64), fp)
    r = subprocess.run([sys.executable, "-c", CHILD, config, os.path.join(root, f"out-{huge_mb}"),
                        "--quiet"], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    os.remove(data)
    kb = [line.split()[1] for line in r.stderr.splitlines() if line.startswith("peak_rss_kb")]
    return int(kb[0]) / 1024


def test_one_huge_record_costs_no_memory(zoo2, tmp_path):
    without = peak_rss_mb(zoo2, str(tmp_path), 0)
    with_huge = peak_rss_mb(zoo2, str(tmp_path), 256)
    assert with_huge <= 1.10 * without, (without, with_huge)
    report = json.load(open(tmp_path / "out-256" / "com_report.json"))
    assert report  # the merge used the file (its first record cut to max_seq_len tokens)


if __name__ == "__main__":  # python -m tests.e2e.test_big_record 1024
    import tempfile

    from tests.support import pico

    size = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    with tempfile.TemporaryDirectory() as root:
        zoo = pico.build_experts(os.path.join(root, "zoo"), n_experts=2, layers=2)
        a, b = peak_rss_mb(zoo, root, 0), peak_rss_mb(zoo, root, size)
        print(f"peak RSS without: {a:.0f} MB; with one {size} MB record: {b:.0f} MB "
              f"({100 * (b / a - 1):+.1f}%)")
