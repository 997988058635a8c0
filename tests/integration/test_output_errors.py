"""What stops a merge from outside its inputs, as one line naming what to do."""

import errno
import os

import pytest

from mergekit_com.errors import OutputError
from mergekit_com.integration import preflight
from mergekit_com.integration.output_errors import output_errors
from mergekit_com.io.workdir import WorkDir


def stopped_by(error: BaseException, out: str) -> str:
    with pytest.raises(OutputError) as got:
        with output_errors(WorkDir(out)):
            raise error
    return str(got.value)


def test_out_path_itself_not_writable_is_named_not_its_directory(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    message = stopped_by(PermissionError(errno.EACCES, "Permission denied", str(out / ".com-publish")),
                         str(out))
    assert message == (f"out_path {out} cannot be written: it is not writable (Permission denied); "
                       "make it writable or choose another out_path, then run the same command again")
    parent = stopped_by(PermissionError(errno.EACCES, "Permission denied", str(tmp_path)), str(out))
    assert parent.startswith(f"out_path {out} cannot be written: its directory {tmp_path} is not writable")


@pytest.mark.parametrize("error", [OSError(errno.EFBIG, "File too large"),
                                   RuntimeError("Error while serializing: I/O error: File too large "
                                                "(os error 27)")])
def test_a_file_past_the_size_limit_says_how_to_write_smaller_ones(tmp_path, error):
    message = stopped_by(error, str(tmp_path / "merged"))
    assert "lower --out-shard-size or choose another filesystem" in message


def test_an_existing_out_path_that_cannot_be_written_is_refused_by_the_out_path_check(tmp_path,
                                                                                      monkeypatch):
    """(run before the lock and the work directory: staged_merge._run_chain_merge)"""
    out = tmp_path / "merged"
    out.mkdir()
    monkeypatch.setattr(preflight.os, "access", lambda path, mode, **kw: path != str(out))
    with pytest.raises(OutputError, match=r"out_path merged is not writable; make it writable"):
        preflight.check_out_path("merged", [str(out), str(out) + ".com-work"], None, {})


def test_a_dangling_symlink_as_out_path_names_where_it_points(tmp_path):
    from mergekit_com.errors import ChainConfigError
    from tests.support.merging import com_config, merge

    out = tmp_path / "merged"
    os.symlink(tmp_path / "gone", out)
    cfg = com_config([{"model": str(tmp_path / "m"), "calibration": "d.jsonl"}])
    with pytest.raises(ChainConfigError, match=rf"out_path {out} is a symlink to {tmp_path / 'gone'}, "
                                               "which does not exist; create that folder"):
        merge(cfg, str(out))
    assert os.path.islink(out) and not os.path.exists(tmp_path / "gone")
