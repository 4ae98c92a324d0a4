"""Longer random sessions of the user's commands keep the record true (the invariants of
tests/test_session_invariants.py, checked by tests/sessions.py after every command); a file of its
own so that pytest-xdist runs it beside the shorter sessions."""

from __future__ import annotations

import os

import pytest
from conftest import requires_data
from sessions import play

pytestmark = requires_data("clinc150")


@pytest.mark.slow
@pytest.mark.parametrize(
    "seed", range(1, 1 + int(os.environ.get("FINETUNE_BUDGET_SESSIONS", "2")))
)
def test_longer_random_sessions_keep_the_record_true(tmp_path, seed):
    log = play(tmp_path, seed=seed, length=9)
    assert len(log) >= 9
