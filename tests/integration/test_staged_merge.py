"""The merge's run-time setting around mergekit: the garbage collector's frozen heap."""

import gc

from mergekit_com.integration.staged_merge import long_lived_objects_frozen


def test_objects_alive_before_the_merge_are_frozen_while_it_runs_only():
    assert gc.get_freeze_count() == 0
    with long_lived_objects_frozen():
        assert gc.get_freeze_count() > 1000  # the interpreter's and the imports' objects
    assert gc.get_freeze_count() == 0


def test_a_process_that_froze_objects_itself_is_left_as_it_is(monkeypatch):
    # the calls, not the count: frozen objects that die meanwhile lower the count by themselves
    calls = []
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(gc, "unfreeze", lambda: calls.append("unfreeze"))
    monkeypatch.setattr(gc, "get_freeze_count", lambda: 12345)  # the process froze some itself
    with long_lived_objects_frozen():
        pass
    assert calls == []
    monkeypatch.setattr(gc, "get_freeze_count", lambda: 0)  # nothing frozen: frozen for the block
    with long_lived_objects_frozen():
        assert calls == ["freeze"]
    assert calls == ["freeze", "unfreeze"]


def test_each_configuration_is_read_once_inside_a_merge_and_handed_out_as_copies(tmp_path, monkeypatch):
    import transformers
    from mergekit.common import ModelReference

    from mergekit_com.integration.mergekit_internals import configs_read_once

    transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2).save_pretrained(tmp_path)
    reads = []
    real = transformers.AutoConfig.from_pretrained
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                        lambda *a, **k: reads.append(a) or real(*a, **k))
    model = ModelReference.parse(str(tmp_path))
    original = ModelReference.config
    with configs_read_once():
        first = model.config()
        first.num_hidden_layers = 7  # mergekit's callers change what they get
        second = model.config()
        model.config(trust_remote_code=True)  # another setting: read on its own
    assert len(reads) == 2
    assert second.num_hidden_layers == 2 and second is not first
    assert ModelReference.config is original
    model.config()
    assert len(reads) == 3  # outside a merge, mergekit's own: read each time
