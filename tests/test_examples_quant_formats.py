"""examples/benchmarks/quant_formats.py's batch search: the largest batch that fits, found
with few trials, whatever the limit and the starting batch."""

import importlib.util
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

_SPEC = importlib.util.spec_from_file_location(
    "quant_formats", Path(__file__).resolve().parents[1] / "examples" / "benchmarks" / "quant_formats.py")
quant_formats = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(quant_formats)


@settings(max_examples=300, deadline=None)
@given(limit=st.integers(0, 20_000), start=st.integers(1, 512))
def test_largest_batch_is_within_a_sixteenth_of_the_limit(limit, start):
    trials = []

    def fits(batch):
        trials.append(batch)
        return batch <= limit

    found = quant_formats.largest_batch(fits, start=start, cap=16_384)
    expected = min(limit, 16_384)
    assert found <= expected and fits(found) or found == 0 == expected
    assert expected - found <= max(1, found // 16)
    assert len(trials) <= 40
