"""The merge's run-time setting around mergekit: the garbage collector's frozen heap."""

import gc

from mergekit_com.integration.staged_merge import long_lived_objects_frozen


def test_objects_alive_before_the_merge_are_frozen_while_it_runs_only():
    assert gc.get_freeze_count() == 0
    with long_lived_objects_frozen():
        assert gc.get_freeze_count() > 1000  # the interpreter's and the imports' objects
    assert gc.get_freeze_count() == 0


def test_a_process_that_froze_objects_itself_is_left_as_it_is():
    gc.freeze()
    try:
        before = gc.get_freeze_count()
        with long_lived_objects_frozen():
            pass
        assert gc.get_freeze_count() == before
    finally:
        gc.unfreeze()
