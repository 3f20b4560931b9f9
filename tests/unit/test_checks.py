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


RC_STATUS = """\
Runlevel: default
 dhcpcd                                        [  started  ]
 sshd                                          [  started 00:01:02 (0)  ]
 cloud-final                                   [  failed  ]
Dynamic Runlevel: hotplugged
Dynamic Runlevel: needed/wanted
 sysfs                                         [  started  ]
Dynamic Runlevel: manual
 netmount                                      [  crashed  ]
Runlevel: boot
 dhcpcd                                        [  started  ]
"""


def test_openrc_service_states_from_rc_status() -> None:
    from imagebuild.smoketest.checks import openrc_service_states

    states = openrc_service_states(RC_STATUS)
    assert states == {"dhcpcd": "started", "sshd": "started", "cloud-final": "failed", "sysfs": "started",
                      "netmount": "crashed"}
    assert openrc_service_states("Runlevel: default\nDynamic Runlevel: manual\n") == {}
