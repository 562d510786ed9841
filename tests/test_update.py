"""Update composition: applying two updates equals applying their composition (hypothesis)."""

from hypothesis import given
from hypothesis import strategies as st

from rsd_toolkit.bridges import Update

ids = st.lists(st.integers(0, 50), max_size=12)


@given(base=ids, r1=st.integers(0, 12), a1=ids, r2=st.integers(0, 24), a2=ids)
def test_then_matches_sequential_application(base, r1, a1, r2, a2):
    r1 = min(r1, len(base))
    u1 = Update(r1, a1)
    mid = u1.apply(base)
    r2 = min(r2, len(mid))
    u2 = Update(r2, a2)
    assert u1.then(u2).apply(base) == u2.apply(mid)
