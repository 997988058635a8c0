"""A large weight file's fingerprint: sampled content and its modification time."""

import os

from mergekit_com.io.fingerprint import BLOCK, BLOCKS, SMALL_FILE, model_fingerprint


def test_a_few_bytes_rewritten_between_the_sampled_blocks_change_a_large_files_fingerprint(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    weights = folder / "model.safetensors"
    size = SMALL_FILE + (1 << 20)
    weights.write_bytes(bytes(size))
    before = model_fingerprint(str(folder))
    # a byte no sampled block reads: the blocks start (size - BLOCK) * i / (BLOCKS - 1)
    gap = (size - BLOCK) // (BLOCKS - 1)
    offset = BLOCK + (gap - BLOCK) // 2
    st = os.stat(weights)
    with open(weights, "r+b") as fp:  # rewritten in place, as a fix of one tensor would be
        fp.seek(offset)
        fp.write(b"\x01")
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert model_fingerprint(str(folder)) != before
    # the one case it misses, as documented: the same rewrite with its time set back
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert model_fingerprint(str(folder)) == before
