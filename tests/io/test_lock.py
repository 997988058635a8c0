"""One merge per out_path: the OS lock, its message, and locks of dead processes."""

import os
import subprocess
import sys
import textwrap

import pytest

from mergekit_com.errors import OutputError
from mergekit_com.io.lock import OutPathBusy, OutPathLock


def test_a_second_holder_stops_at_once_naming_the_first(tmp_path):
    path = str(tmp_path / "out.com-work.lock")
    with OutPathLock(path, "out"):
        with pytest.raises(OutPathBusy, match=rf"out_path out is being merged by another process "
                                              rf"\(pid {os.getpid()} on host \S+, started "):
            OutPathLock(path, "out").acquire()
        assert os.path.exists(path)
    assert not os.path.exists(path), "the lock file outlived the merge"
    with OutPathLock(path, "out"):  # free again
        pass


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    path = str(tmp_path / "out.com-work.lock")
    script = textwrap.dedent(f"""
        import os
        from mergekit_com.io.lock import OutPathLock
        OutPathLock({path!r}, "out").acquire()
        os._exit(9)  # killed while holding it: the file stays, the kernel drops the lock
    """)
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    assert os.path.exists(path)
    with OutPathLock(path, "out"):
        pass


def test_the_lock_file_is_never_followed_through_a_symlink(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    os.symlink(victim, tmp_path / "out.com-work.lock")
    with pytest.raises(OutputError, match=r"out.com-work.lock is in the way of out_path out's lock "
                                          r"file \(Too many levels of symbolic links\); move it away"):
        OutPathLock(str(tmp_path / "out.com-work.lock"), "out").acquire()
    assert victim.read_text() == "keep"


def test_a_folder_where_the_lock_file_goes_is_named_in_one_line(tmp_path):
    (tmp_path / "out.com-work.lock").mkdir()
    with pytest.raises(OutputError, match=r"is in the way of out_path out's lock file \(Is a directory\)"):
        OutPathLock(str(tmp_path / "out.com-work.lock"), "out").acquire()
    assert (tmp_path / "out.com-work.lock").is_dir()
