"""The `make ui` page in headless Chromium (scripts/ui_check.py): slow, it runs a tiny sweep,
`mlflow ui` and Chromium. `make install` installs Debian's chromium where it can; the test skips
without it, and fails instead with FINETUNE_BUDGET_REQUIRE_SERVICES=1 (.ci/run sets it)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def needs_chromium() -> None:
    reason = "needs Debian's chromium (make install installs it as root: apt-get install chromium)"
    if shutil.which("chromium") is None:
        if os.environ.get("FINETUNE_BUDGET_REQUIRE_SERVICES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.mark.slow
def test_the_ui_opens_a_sweep_on_its_runs_and_charts_mrr_against_n(tmp_path, capsys):
    needs_chromium()
    import ui_check

    png = tmp_path / "ui.png"
    # --settle 3: the checks below poll the page until it shows what they read
    args = ["--out", str(png), "--port", "5991", "--cdp-port", "9341", "--settle", "3"]
    assert ui_check.main(args) == 0
    out = capsys.readouterr().out
    assert "3 training runs, 3 listed" in out
    assert "chart data.n vs. val/mrr_at_20: 3 points" in out
    assert '["32","64","128"]' in out  # one point per job, at its data.n
    assert png.stat().st_size > 20_000  # a drawn page, not a blank one
