"""A seeded sample of the fuzzer (``python -m tests.fuzz --n 100000`` runs the whole)."""

import pytest

from .fuzz import run


@pytest.mark.parametrize("seed", [11, 12])
def test_a_seeded_sample_of_hostile_requests_finds_no_fault(seed):
    assert run(400, seed) == []
