"""Self-contained interactive HTML for prediction trajectories.

The page needs no network: our own small vanilla-JS/CSS layer (`viz/assets/`) is inlined,
and the data rides along as a JSON `<script type="application/json">` block. Why not
plotly: plotly 6 changed its heatmap API and broke every tuned-lens trajectory plot; a
hundred lines of our own JS cannot break that way (see docs/visualization.md).

Safety: token text is data, never markup. The JSON is escaped so `</script>` cannot end the
block, the JS only writes tokens with `textContent`, and a Content-Security-Policy allows
only our own inline script (by hash), so an injected `<script>` could not run either.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, TypeGuard

from lensforge.analysis.trajectory import STATS, PredictionTrajectory, visible_token
from lensforge.errors import ConfigError

STAT_SHORT = {"entropy": "entropy", "kl": "KL to final", "max_prob": "max p",
              "ce": "CE true next", "rank": "rank true next"}


def asset_text(name: str) -> str:
    """Text of a file shipped in lensforge/viz/assets/."""
    return resources.files("lensforge.viz").joinpath("assets").joinpath(name).read_text(encoding="utf-8")


def json_for_script(obj: object) -> str:
    """JSON that is safe inside a `<script>` element: '<', '>' and '&' are \\u-escaped, so no
    token can close the element or open a comment; U+2028/9 are escaped for old parsers."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def trajectory_payload(
    traj: PredictionTrajectory,
    *,
    stat: str = "entropy",
    lens: str | None = None,
    compare: str | None = None,
    title: str | None = None,
) -> dict:
    """The JSON the grid script reads. Token strings are sent already made visible
    (`visible_token`); the script only truncates them."""
    if stat not in STATS:
        raise ConfigError(f"unknown statistic '{stat}'; choose from {', '.join(STATS)}")
    names = list(traj.lenses)
    lens = lens or names[-1]
    for name in (lens, compare):
        if name and name not in traj.lenses:
            raise ConfigError(f"no lens named '{name}' in this trajectory ({', '.join(names)})")
    k = int(next(iter(traj.lenses.values())).top_ids.shape[-1])
    stats = []
    for key, info in STATS.items():
        lo, hi = traj.stat_range(key)
        stats.append({"key": key, "label": str(info["label"]), "short": STAT_SHORT[key],
                      "lo": lo, "hi": hi, "scale": str(info["scale"]),
                      "lower_is_better": bool(info["lower_is_better"]),
                      "clipped": key in ("kl", "ce")})
    data = traj.to_dict()
    targets = traj.targets.tolist()
    return {
        "title": title or "",
        "model": traj.model_id,
        "layers": traj.layer_labels,
        "tokens": [visible_token(t) for t in traj.tokens],
        "next": [None if i < 0 else visible_token(traj.text_of(i)) for i in targets],
        "vocab": {str(i): visible_token(t) for i, t in traj.token_text.items()},
        "top_k": k,
        "stats": stats,
        "stat": stat,
        "lens": lens,
        "compare": compare or "",
        "lenses": {
            name: {"top_ids": g["top_ids"], "top_probs": g["top_probs"],
                   "stats": {key: g[key] for key in STATS}}
            for name, g in data["lenses"].items()
        },
    }


def trajectory_fragment(traj: PredictionTrajectory, **kwargs: Any) -> str:
    """One `<div class="lf-traj">` widget (needs `page_head` styles and `page_script`)."""
    payload = trajectory_payload(traj, **kwargs)
    return ('<div class="lf-traj"><script type="application/json" class="lf-data">'
            f"{json_for_script(payload)}</script></div>")


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def html_page(title: str, body: str, *, with_script: bool = True) -> str:
    """A complete page: inline CSS and (optionally) the grid script, with a CSP that allows
    only those two and data: images (no network, no injected scripts)."""
    css = asset_text("trajectory.css")
    js = asset_text("trajectory.js") if with_script else ""
    if "</script" in js.lower() or "</style" in css.lower():
        raise AssertionError("asset text would close its own element")
    csp = (f"default-src 'none'; style-src {_csp_hash(css)}; img-src data:; "
           f"script-src {_csp_hash(js) if js else chr(39) + 'none' + chr(39)}")
    script = f"<script>{js}</script>" if js else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{csp}\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{css}</style>\n</head>\n<body>\n"
        f"{body}\n{script}\n</body>\n</html>\n"
    )


def trajectory_html(
    trajs: PredictionTrajectory | Sequence[PredictionTrajectory],
    *,
    title: str | None = None,
    stat: str = "entropy",
    lens: str | None = None,
    compare: str | None = None,
) -> str:
    """A full page with one grid per trajectory."""
    items = [trajs] if isinstance(trajs, PredictionTrajectory) else list(trajs)
    if not items:
        raise ConfigError("no trajectories to show")
    first = items[0]
    title = title or f"Prediction trajectory: {first.model_id}"
    sub = (f"{first.model_id} · {first.n_rows - 1} layers · lenses: "
           f"{', '.join(first.lenses)} · {sum(t.n_positions for t in items)} tokens")
    parts = [f"<h1>{html.escape(title)}</h1>", f'<div class="lf-sub">{html.escape(sub)}</div>']
    parts += [trajectory_fragment(t, stat=stat, lens=lens, compare=compare) for t in items]
    return html_page(title, "\n".join(parts))


def write_trajectory_html(
    trajs: PredictionTrajectory | Sequence[PredictionTrajectory],
    path: str | Path,
    **kwargs: Any,
) -> Path:
    """Write `trajectory_html(...)` to `path` (UTF-8); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(trajectory_html(trajs, **kwargs), encoding="utf-8")
    return out


def image_data_uri(path: str | Path) -> str:
    """A PNG/SVG file as a data: URI, for self-contained pages."""
    p = Path(path)
    mime = "image/svg+xml" if p.suffix == ".svg" else "image/png"
    return f"data:{mime};base64," + base64.b64encode(p.read_bytes()).decode()


def is_finite_number(x: object) -> TypeGuard[int | float]:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
