"""The trajectory page in real headless Chromium, driven over the DevTools protocol.

Chromium is the Debian package (`apt-get install -y chromium`); the test skips when
/usr/bin/chromium is missing. The DevTools client is ~60 lines of stdlib: Chromium's
`--remote-debugging-pipe` speaks NUL-terminated JSON on file descriptors 3 and 4, so no
websocket library or Playwright download is needed.

Run as a script to screenshot any page: `python tests/test_html_browser.py PAGE.html OUT.png
[WIDTH HEIGHT] [--hover R,T] [--compare NAME] [--stat KEY]`.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # lensforge as a user runs it

CHROMIUM = os.environ.get("LENSFORGE_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-pipe"]


class Chromium:
    """Minimal DevTools-protocol client over --remote-debugging-pipe (one page)."""

    def __init__(self, width: int = 1400, height: int = 900, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="lf-chromium-")
        to_child_r, self._to_child_w = os.pipe()
        self._from_child_r, from_child_w = os.pipe()

        def wire_fds() -> None:  # runs in the child: its fd 3 reads, fd 4 writes
            # Copies above 4 first, so placing one cannot overwrite the other; dup2 makes
            # 3 and 4 inheritable, every other descriptor of ours closes on exec.
            r, w = os.dup(to_child_r), os.dup(from_child_w)
            r, w = fcntl.fcntl(r, fcntl.F_DUPFD, 10), fcntl.fcntl(w, fcntl.F_DUPFD, 10)
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=wire_fds, close_fds=False)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._next_id = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    # ------------------------------------------------------------ protocol
    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_child_r], [], [], left)[0]:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self._from_child_r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, session: str | None = None, **params: object) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def send(self, method: str, **params: object) -> dict:
        """A command to the page's session."""
        return self.call(method, self.session, **params)

    def wait_event(self, method: str) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._read_message(deadline))

    # ------------------------------------------------------------- helpers
    def open(self, path: Path) -> None:
        self.events.clear()
        self.send("Page.navigate", url=Path(path).resolve().as_uri())
        self.wait_event("Page.loadEventFired")

    def js(self, expression: str) -> object:
        res = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                        awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"JS error: {res['exceptionDetails']}")
        return res["result"].get("value")

    def hover(self, x: float, y: float) -> None:
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        params: dict = {"format": "png"}
        if full_page:
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            params["clip"] = {"x": 0, "y": 0, "width": size["width"], "height": size["height"],
                              "scale": 1}
            params["captureBeyondViewport"] = True
        data = self.send("Page.captureScreenshot", **params)["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_child_w, self._from_child_r):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- page helpers
CELL_STATE = ("Array.from(document.querySelectorAll('.lf-panel td.lf-cell'))"
              ".map(td => td.textContent + '|' + td.style.background)")


def cell_center(browser: Chromium, panel: int, r: int, t: int) -> tuple[float, float]:
    rect = browser.js(
        f"(() => {{ const p = document.querySelectorAll('.lf-panel')[{panel}];"
        f" const td = p.querySelector('td.lf-cell[data-r=\"{r}\"][data-t=\"{t}\"]');"
        f" td.scrollIntoView({{block: 'center', inline: 'center'}});"
        f" const b = td.getBoundingClientRect(); return [b.x + b.width / 2, b.y + b.height / 2];"
        f" }})()")
    return rect[0], rect[1]


def choose(browser: Chromium, cls: str, value: str) -> None:
    """Pick an option the way a user does: set the value and fire `change`."""
    browser.js(f"(() => {{ const s = document.querySelector('select.{cls}'); s.value = "
               f"{json.dumps(value)}; s.dispatchEvent(new Event('change')); }})()")


# ----------------------------------------------------------------------- test
HOSTILE = "<script>window.__pwned=1</script>"
HOSTILE_IMG = "<img src=x onerror=window.__pwned=2>"


class FakeTokenizer:
    """Tiny-model vocabulary (128 ids) with hostile, whitespace and non-ASCII tokens."""

    special = {5: HOSTILE, 6: HOSTILE_IMG, 7: " the", 8: "\n", 9: "\t", 10: "日本語",
               11: "😀", 12: "supercalifragilistic", 13: "a&b"}

    def decode(self, ids: list[int], **_: object) -> str:
        return "".join(self.special.get(i, f"t{i}") for i in ids)

    def convert_ids_to_tokens(self, i: int) -> str:
        return self.decode([i])


@pytest.mark.browser
def test_trajectory_page_in_chromium(tiny_adapter, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium "
                    "(apt-get update && apt-get install -y chromium)")
    import torch

    from lensforge.analysis.trajectory import PredictionTrajectory, visible_token
    from lensforge.lenses import LogitLens, LowRankLens
    from lensforge.viz.html import write_trajectory_html

    adapter = tiny_adapter("llama")
    adapter.tokenizer = FakeTokenizer()
    lora = LowRankLens.from_model(adapter, rank=4)
    with torch.no_grad():
        lora.up.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([5, 7, 8, 9, 10, 11, 12, 6, 13, 40, 41, 42])
    traj = PredictionTrajectory.from_ids(adapter, ids,
                                         {"logit": LogitLens.from_model(adapter), "lora": lora})
    page = write_trajectory_html(traj, tmp_path / "page.html", lens="lora", stat="entropy")
    R, T = traj.n_rows, traj.n_positions

    with Chromium(width=1300, height=700) as browser:
        browser.open(page)
        # The grid: one cell per (row, position); hostile tokens are text, not markup.
        assert browser.js("document.querySelectorAll('.lf-panel').length") == 1
        assert browser.js("document.querySelectorAll('.lf-panel td.lf-cell').length") == R * T
        assert browser.js("window.__pwned === undefined")
        assert browser.js("document.querySelectorAll('.lf-grid script, .lf-grid img').length") == 0
        inputs = browser.js("Array.from(document.querySelectorAll('th.lf-input'))"
                            ".map(th => th.title)")
        assert inputs == [visible_token(t) for t in traj.tokens]
        assert inputs[0] == HOSTILE and inputs[1] == "␣the" and inputs[2] == "↵"
        assert inputs[4] == "日本語" and inputs[5] == "😀"
        shown = browser.js("Array.from(document.querySelectorAll('th.lf-input'))"
                           ".map(th => th.textContent)")
        assert shown[6] == "superc…"  # long tokens truncated, full text in the title

        # Hover: the tooltip lists the top-5 of that cell with probabilities.
        r, t = 1, 0
        browser.hover(*cell_center(browser, 0, r, t))
        assert browser.js("!document.querySelector('.lf-tip').hidden")
        rows = browser.js("Array.from(document.querySelectorAll('.lf-tip-row'))"
                          ".map(tr => [tr.querySelector('.lf-tip-tok').textContent,"
                          " tr.querySelector('.lf-tip-p').textContent])")
        expect_ids = traj.lenses["lora"].top_ids[r, t].tolist()
        expect_p = traj.lenses["lora"].top_probs[r, t].tolist()
        assert [tok for tok, _ in rows] == [visible_token(traj.text_of(i)) for i in expect_ids]
        assert [float(p.rstrip("%")) for _, p in rows] == pytest.approx(
            [100 * p for p in expect_p], abs=0.06)
        tip_text = browser.js("document.querySelector('.lf-tip').textContent")
        assert HOSTILE in tip_text and "lora" in tip_text and "layer 1" in tip_text
        browser.screenshot(tmp_path / "hover.png")

        # Switching lens changes the cells; switching statistic changes the colors.
        before = browser.js(CELL_STATE)
        choose(browser, "lf-lens", "logit")
        after_lens = browser.js(CELL_STATE)
        assert browser.js("document.querySelector('.lf-panel-title').textContent") == "logit"
        assert after_lens != before and len(after_lens) == R * T
        logit_top1 = [visible_token(x) for x in traj.top1("logit")[R - 2]]
        cells = browser.js(f"Array.from(document.querySelectorAll('td.lf-cell[data-r=\"{R - 2}\"]'))"
                           ".map(td => td.textContent)")
        assert [c.rstrip("…") for c in cells] == [x[: len(c.rstrip("…"))]
                                                  for c, x in zip(cells, logit_top1, strict=True)]
        choose(browser, "lf-stat", "kl")
        after_stat = browser.js(CELL_STATE)
        assert [c.split("|")[0] for c in after_stat] == [c.split("|")[0] for c in after_lens]
        assert [c.split("|")[1] for c in after_stat] != [c.split("|")[1] for c in after_lens]
        legend = browser.js("document.querySelector('.lf-legend-label').textContent")
        assert legend.startswith("KL")

        # Side by side: two panels, each a full grid.
        choose(browser, "lf-compare", "lora")
        assert browser.js("Array.from(document.querySelectorAll('.lf-panel'))"
                          ".map(p => p.dataset.lens)") == ["logit", "lora"]
        assert browser.js("document.querySelectorAll('.lf-panel td.lf-cell').length") == 2 * R * T
        browser.hover(*cell_center(browser, 1, 0, 3))
        assert "lora · layer 0 · position 3" in browser.js(
            "document.querySelector('.lf-tip-head').textContent")
        shot = browser.screenshot(tmp_path / "compare.png")

    assert shot.stat().st_size > 10_000
    from matplotlib.image import imread

    img = imread(shot)
    assert img.shape[0] == 700 and img.shape[1] == 1300
    assert float(img[..., :3].std()) > 0.05  # not a blank page
    keep = os.environ.get("LENSFORGE_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "browser_compare.png")
        shutil.copy(tmp_path / "hover.png", Path(keep) / "browser_hover.png")


# ----------------------------------------------------------------------- script
def _main(argv: list[str]) -> int:
    """Screenshot a page: PAGE OUT [W H] [--hover R,T[,PANEL]] [--compare N] [--stat K]
    [--lens N] [--full]."""
    opts: dict[str, str] = {}
    pos: list[str] = []
    it = iter(argv)
    for a in it:
        if a == "--full":
            opts["full"] = "1"
        elif a.startswith("--"):
            opts[a[2:]] = next(it)
        else:
            pos.append(a)
    page, out = Path(pos[0]), Path(pos[1])
    width, height = (int(pos[2]), int(pos[3])) if len(pos) >= 4 else (1400, 900)
    with Chromium(width=width, height=height) as browser:
        browser.open(page)
        for key, cls in (("lens", "lf-lens"), ("stat", "lf-stat"), ("compare", "lf-compare")):
            if key in opts:
                choose(browser, cls, opts[key])
        if "scroll" in opts:
            browser.js(f"document.querySelectorAll('.lf-scroll').forEach(s => "
                       f"s.scrollLeft = {int(opts['scroll'])})")
        if "hover" in opts:
            r, t, *panel = (int(x) for x in opts["hover"].split(","))
            browser.hover(*cell_center(browser, panel[0] if panel else 0, r, t))
        browser.screenshot(out, full_page="full" in opts)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
