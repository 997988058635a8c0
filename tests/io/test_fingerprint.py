"""A large weight file's fingerprint: sampled content, and its modification time apart."""

import os

from mergekit_com.io.fingerprint import (
    BLOCK,
    BLOCKS,
    SMALL_FILE,
    large_file_times,
    model_fingerprint,
    retimed_files,
)
from mergekit_com.io.workdir import WorkDir


def stamp(folder) -> dict:
    return {"format": 3, "models": {"m": model_fingerprint(str(folder))},
            "times": {"m": large_file_times(str(folder))}}


def test_a_large_file_rewritten_between_its_sampled_blocks_is_named_when_resuming(tmp_path, caplog):
    """The sampled content cannot see a byte between the blocks; its new modification time
    is named in a warning, and the resume goes on (a copy of the same model elsewhere, or
    on another rank's machine, has other times too: refusing would cost the work so far)."""
    folder = tmp_path / "model"
    folder.mkdir()
    weights = folder / "model.safetensors"
    size = SMALL_FILE + (1 << 20)
    weights.write_bytes(bytes(size))
    (folder / "config.json").write_text("{}")
    before = stamp(folder)
    WorkDir(str(tmp_path / "merged")).open(before, resume_only=False)
    # a byte no sampled block reads: the blocks start at (size - BLOCK) * i / (BLOCKS - 1)
    gap = (size - BLOCK) // (BLOCKS - 1)
    st = os.stat(weights)
    with open(weights, "r+b") as fp:  # rewritten in place, as a fix of one tensor would be
        fp.seek(BLOCK + (gap - BLOCK) // 2)
        fp.write(b"\x01")
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    after = stamp(folder)
    assert after["models"] == before["models"]  # the content it samples is the same
    assert retimed_files(before, after) == ["m: model.safetensors"]
    assert retimed_files(before, before) == [] and retimed_files({}, after) == []
    WorkDir(str(tmp_path / "merged")).open(after, resume_only=False)
    assert ("m: model.safetensors: a new modification time, with the same sampled content"
            in caplog.text)
