"""The pinned merges give the outputs recorded before the layered redesign (issue 10)."""

import pytest

from tests.support import pinned


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return pinned.materialize(str(tmp_path_factory.mktemp("pinned")))


@pytest.fixture(scope="module")
def recorded():
    return pinned.recorded()


@pytest.mark.parametrize("case", sorted(pinned.CASES))
def test_pinned_merge_is_unchanged(case, inputs, recorded, tmp_path):
    got = pinned.run_case(case, inputs, str(tmp_path / "out"))
    want = recorded[case]
    assert got.keys() == want.keys()
    for name, expected in want.items():
        err = ((got[name].double() - expected.double()).norm() / expected.double().norm()).item()
        assert err <= 1e-6, f"{case}: {name} moved by {err:.2e} (relative)"
