"""Check the `make ui` page in headless Chromium: the experiment opens as a model-training
experiment on its runs table, and a chart of val/mrr_at_20 against data.n shows the sweep's runs.

    python scripts/ui_check.py                       # a tiny 3-job sweep, then the check
    python scripts/ui_check.py --db mlflow.db --out docs/img/mlflow_ui_sweep.png   # your store

Starts `mlflow ui` (as `make ui` does, on --port) and Chromium (/usr/bin/chromium) with its
DevTools protocol, sets the experiment page's saved chart layout (the same browser-local state the
UI writes when you add the chart by hand: Chart view, Add chart, Scatter, X = data.n, Y =
val/mrr_at_20), reads the page and saves a screenshot. Exits 1 with one line when a check fails.
Run by tests/test_ui_check.py (marked slow).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRIC, PARAM = "val/mrr_at_20", "data.n"
# the budget chart is the page's first plot; plotly keeps its traces on the plot element: count
# the (x, y) pairs with both values set (one per run)
SCATTER_POINTS = """(() => {
  const plot = document.querySelector('.js-plotly-plot');
  if (!plot || !plot.data) return 0;
  let n = 0;
  for (const t of plot.data) {
    const xs = t.x || [], ys = t.y || [];
    for (let i = 0; i < xs.length; i++) {
      if (xs[i] !== null && xs[i] !== undefined && ys[i] !== null && ys[i] !== undefined) n++;
    }
  }
  return n;
})()"""
PLOT_TRACES = """(() => {
  const plot = document.querySelector('.js-plotly-plot');
  return plot && plot.data ? JSON.stringify(plot.data.map(t => [t.name, t.x, t.y])) : '';
})()"""
CLOSE_ASSISTANT = """
for (const b of document.querySelectorAll('button')) {
  const label = (b.getAttribute('aria-label') || '').toLowerCase();
  const panel = b.closest('div') && b.closest('div').parentElement;
  if (label.includes('close') && panel && panel.innerText.includes('MLflow Assistant')) {
    b.click(); break;
  }
}
"""


def tiny_sweep(db: Path, work: Path) -> None:
    """`python train.py -m data.n=32,64,128` on a tiny random BERT into `db`."""
    cmd = [
        sys.executable, "train.py", "-m", "data.n=32,64,128", "trainer.max_epochs=1",
        "model=tiny_bert", "trainer.accelerator=cpu", "trainer.precision=32-true",
        "trainer.limit_val_batches=4", "trainer.enable_progress_bar=false", "logger=none",
        "optim.optimizer.lr=1e-3", "tracking.log_model=false", f"tracking.uri=sqlite:///{db}",
        f"paths.cache_dir={work / 'cache'}", f"hydra.sweep.dir={work / 'multirun'}",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"error: the tiny sweep failed: {(out.stdout + out.stderr)[-2000:]}")


def wait_for(url: str, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"error: {url} did not answer within {timeout_s:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """Terminate a process we started; kill it if it does not end within 30 s."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


class Browser:
    """Headless Chromium driven through the DevTools protocol (one page)."""

    def __init__(self, port: int, profile: Path, size: tuple[int, int] = (1600, 1000)) -> None:
        import websocket  # websocket-client

        chromium = shutil.which("chromium") or "/usr/bin/chromium"
        self.proc = subprocess.Popen(
            [
                chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                f"--remote-debugging-port={port}", f"--user-data-dir={profile}",
                f"--window-size={size[0]},{size[1]}", "about:blank",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(f"http://127.0.0.1:{port}/json/version", 60)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as response:
            page = next(t for t in json.load(response) if t["type"] == "page")
        self.ws = websocket.create_connection(
            page["webSocketDebuggerUrl"], timeout=600, suppress_origin=True
        )
        self.n = 0

    def call(self, method: str, **params) -> dict:
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise SystemExit(f"error: chromium {method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def open(self, url: str, settle_s: float) -> None:
        self.call("Page.navigate", url=url)
        time.sleep(settle_s)

    def text_when(self, needles: Sequence[str], timeout_s: float, or_at: str | None = None) -> str:
        """The page's text once it contains every one of `needles`, or once the app has moved to
        a page whose address contains `or_at` (or at the timeout)."""
        deadline = time.time() + timeout_s
        text = ""
        while time.time() < deadline:
            text = self.js("document.body ? document.body.innerText : ''") or ""
            if all(n in text for n in needles):
                break
            if or_at and or_at in (self.js("location.href") or ""):
                break
            time.sleep(1)
        return text

    def wait_js(self, expression: str, at_least: int, timeout_s: float) -> int:
        """The number `expression` evaluates to, once it reaches `at_least` (or at the timeout)."""
        deadline = time.time() + timeout_s
        value = 0
        while time.time() < deadline:
            value = int(self.js(expression) or 0)
            if value >= at_least:
                break
            time.sleep(1)
        return value

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        self.ws.close()
        stop(self.proc)


def chart_layout(parent_ids: list[str]) -> dict:
    """The experiment page's saved UI state: training runs only, sweeps expanded, a scatter chart
    of METRIC against PARAM first (MLflow adds its per-metric charts after it)."""
    section = "finetune-budget-section"
    return {
        "searchFilter": "tags.run_type = 'train'",
        "runsExpanded": {run_id: True for run_id in parent_ids},
        "runsHiddenMode": "SHOW_ALL",
        "compareRunCharts": [
            {
                "uuid": "finetune-budget-mrr-vs-n",
                "type": "SCATTER",
                "runsCountToCompare": 100,
                "metricSectionId": section,
                "deleted": False,
                "isGenerated": False,
                "xaxis": {"key": PARAM, "type": "PARAM"},
                "yaxis": {"key": METRIC, "type": "METRIC"},
            }
        ],
        "compareRunSections": [
            {
                "uuid": section,
                "name": "budget",
                "display": True,
                "isReordered": True,
                "deleted": False,
                "isGenerated": False,
            }
        ],
        "isAccordionReordered": True,
        "hideEmptyCharts": True,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", help="an MLflow sqlite file (default: a new tiny sweep)")
    parser.add_argument("--experiment", default="finetune-budget")
    parser.add_argument("--out", default=str(ROOT / "docs" / "img" / "mlflow_ui_sweep.png"))
    parser.add_argument("--port", type=int, default=5987)
    parser.add_argument("--cdp-port", type=int, default=9337)
    parser.add_argument("--settle", type=float, default=15.0, help="seconds for the page to draw")
    args = parser.parse_args(argv)
    from mlflow.tracking import MlflowClient

    work = Path(tempfile.mkdtemp(prefix="finetune_budget_ui_"))
    db = Path(args.db).resolve() if args.db else work / "mlflow.db"
    if not args.db:
        tiny_sweep(db, work)
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        raise SystemExit(f"error: no experiment {args.experiment!r} in {db}")
    exp_id = experiment.experiment_id
    runs = client.search_runs([exp_id], "tags.run_type = 'train'", max_results=1000)
    parents = sorted(
        {r.data.tags["mlflow.parentRunId"] for r in runs if "mlflow.parentRunId" in r.data.tags}
    )
    ui = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("mlflow")), "ui", "--backend-store-uri",
            f"sqlite:///{db}", "--host", "127.0.0.1", "--port", str(args.port), "--workers", "1",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{args.port}"
    browser = None
    failures = []
    try:
        wait_for(base + "/health", 300)
        browser = Browser(args.cdp_port, work / "chromium")
        page = f"{base}/#/experiments/{exp_id}"
        browser.open(page, args.settle)  # what `make ui` shows a browser that has no settings yet
        # MLflow may open an experiment on its overview (the GenAI workflow's first page)
        first = browser.text_when(["matching runs"], 60, or_at="/overview")
        landed = browser.js("location.href") or ""
        opened_on = "runs table" if "matching runs" in first else f"no runs table ({landed})"
        state_key = f'MLflowLocalStorage-1.1-ExperimentPage-["{exp_id}"]-ReactComponentState'
        layout = json.dumps(chart_layout(parents))
        expand_key = f"MLflowLocalStorage-1.1-ExperimentView-{exp_id}-expandRows"
        # set the layout from a page of the same origin that is not the app, so that the app
        # (still saving its own state after the first visit) cannot overwrite it
        browser.open(base + "/health", 2)
        browser.js(
            f"localStorage.setItem({json.dumps(state_key)}, {json.dumps(layout)});"
            f"localStorage.setItem({json.dumps(expand_key)}, 'true');"
            "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
        )
        query = urllib.parse.urlencode(
            {"workflowType": "machine_learning", "compareRunsMode": "CHART"}
        )
        names = [r.info.run_name for r in runs]
        shows = ["matching runs", f"{PARAM} vs.", *filter(None, names)]  # what is checked below
        browser.open(f"{page}/runs?{query}", args.settle)
        points = browser.wait_js(SCATTER_POINTS, len(runs), 120)
        if points < len(runs):  # the app may still have been saving its own first-visit state
            browser.open(f"{page}/runs?{query}", args.settle)
            points = browser.wait_js(SCATTER_POINTS, len(runs), 120)
        text = browser.text_when(shows, 120)  # the page drawn (a loaded machine draws slowly)
        traces = browser.js(PLOT_TRACES)
        browser.js(CLOSE_ASSISTANT)
        time.sleep(2)
        browser.screenshot(Path(args.out))
        shown = [n for n in names if n and n in text]
        if experiment.tags.get("mlflow.experimentKind") != "custom_model_development":
            failures.append(
                "the experiment is not tagged mlflow.experimentKind=custom_model_development"
            )
        if "matching runs" not in text:
            failures.append("the runs page shows no runs table")
        if f"{PARAM} vs." not in text or points < len(runs):
            failures.append(
                f"the chart of {METRIC} against {PARAM} shows {points} of {len(runs)} runs"
            )
        if len(shown) < len(names):
            failures.append(f"the runs list shows {len(shown)} of the {len(names)} training runs")
        print(f"experiment {exp_id} ({db}): {len(names)} training runs, {len(shown)} listed")
        print(f"{page} opened on the {opened_on} (a browser's first visit)")
        print(f"runs page: {page}/runs?workflowType=machine_learning")
        print(f"chart {PARAM} vs. {METRIC}: {points} points")
        print(f"  its traces (name, x, y): {traces}")
        print(f"screenshot: {args.out} ({Path(args.out).stat().st_size // 1024} KB)")
    finally:
        if browser is not None:
            browser.close()
        stop(ui)
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
