"""``make test-mergekit``: mergekit's own test suite, run with this package installed.

mergekit ships its tests in the sdist on PyPI, without ``tests/common.py``.
This downloads the sdist of the installed mergekit version with pip (into
``.mergekit-suite/``, ignored by git), unpacks only ``tests/`` and mergekit's
``pyproject.toml`` (its pytest settings), adds ``common.py`` (written here from
what the tests import) and ``suite_plugin.py`` as ``conftest.py``, and runs
pytest there against the installed mergekit. Extra arguments go to pytest.
"""

import glob
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DEST = os.path.join(REPO, ".mergekit-suite")


def fetch(version: str) -> str:
    """The folder holding mergekit's tests for ``version`` (downloaded once)."""
    root = os.path.join(DEST, f"mergekit-{version}")
    if not os.path.isdir(os.path.join(root, "tests")):
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                            "--no-binary", ":all:", f"mergekit=={version}", "-d", tmp], check=True)
            sdist, = glob.glob(os.path.join(tmp, "mergekit-*.tar.gz"))
            staging = os.path.join(tmp, "unpacked")
            with tarfile.open(sdist) as tar:
                wanted = [m for m in tar.getmembers()
                          if m.name.split("/")[1:2] == ["tests"]
                          or m.name.split("/")[1:] == ["pyproject.toml"]]
                tar.extractall(staging, members=wanted, filter="data")
            os.makedirs(DEST, exist_ok=True)
            shutil.rmtree(root, ignore_errors=True)
            shutil.move(os.path.join(staging, f"mergekit-{version}"), root)
    tests = os.path.join(root, "tests")
    # a package, so that `tests.common` is this folder's and not the repository's own tests
    open(os.path.join(tests, "__init__.py"), "a").close()
    shutil.copy(os.path.join(HERE, "common.py"), os.path.join(tests, "common.py"))
    shutil.copy(os.path.join(HERE, "suite_plugin.py"), os.path.join(tests, "conftest.py"))
    return root


def main() -> int:
    root = fetch(importlib.metadata.version("mergekit"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rxs", "tests",
           *sys.argv[1:]]
    return subprocess.run(cmd, cwd=root, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
