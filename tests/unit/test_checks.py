"""A smoke-test check that raises is a failed check; a signal is not a failure."""

from __future__ import annotations

import pytest

from imagebuild.errors import Interrupted
from imagebuild.smoketest.checks import Check

pytestmark = pytest.mark.unit


def test_a_check_that_raises_is_a_failed_check() -> None:
    def broken(_session: object) -> tuple[bool, str]:
        raise ValueError("no such file")

    result = Check("broken", broken).run(None)  # type: ignore[arg-type]
    assert not result.passed
    assert "ValueError: no such file" in result.detail


def test_an_interruption_during_a_check_ends_the_run() -> None:
    def interrupted(_session: object) -> tuple[bool, str]:
        raise Interrupted("interrupted by SIGTERM; cleaned up")

    with pytest.raises(Interrupted):
        Check("interrupted", interrupted).run(None)  # type: ignore[arg-type]
