"""One round of the soak (make soak) in the test suite: workers die, no guest is lost."""

from __future__ import annotations

import pytest

from testbed import soak


def test_one_soak_round_loses_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert soak.main(["--minutes", "0", "--guests", "200", "--chaos-period", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "no guest lost" in out
    kills = int(out.split(" workers killed")[0].rsplit(" ", 1)[1])
    assert kills > 0, "the chaos killed no worker: the round proved nothing"
