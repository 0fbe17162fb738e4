/* lensforge trajectory grid: vanilla JS, no dependencies, no network.
 * Every <div class="lf-traj"> holding a <script type="application/json" class="lf-data">
 * becomes an interactive layer x position grid. Token text is only ever set through
 * textContent, never innerHTML, so tokens such as "<script>" render as text. */
(function () {
  "use strict";

  // ColorBrewer YlGnBu: light = close to the model / confident, dark = far / unsure.
  var PALETTE = ["#ffffd9", "#edf8b1", "#c7e9b4", "#7fcdbb", "#41b6c4",
                 "#1d91c0", "#225ea8", "#253494", "#081d58"];
  var RGB = PALETTE.map(function (h) {
    return [1, 3, 5].map(function (i) { return parseInt(h.slice(i, i + 2), 16); });
  });
  var MISSING = [232, 232, 232];
  var CELL_CHARS = 7;

  function colorAt(x) {
    x = Math.min(1, Math.max(0, x));
    var p = x * (RGB.length - 1);
    var i = Math.min(Math.floor(p), RGB.length - 2);
    var f = p - i;
    return [0, 1, 2].map(function (k) {
      return Math.round(RGB[i][k] + f * (RGB[i + 1][k] - RGB[i][k]));
    });
  }
  function css(c) { return "rgb(" + c.join(",") + ")"; }
  function ink(c) { return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] > 150 ? "#111" : "#fff"; }
  function chars(s) { return Array.from(s); }  // code points, so emoji are not split
  function shorten(s, n) {
    var c = chars(s);
    return c.length <= n ? s : c.slice(0, n - 1).join("") + "\u2026";
  }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function fmt(v, key) {
    if (v === null || v === undefined) return "\u2014";
    if (key === "rank") return String(v);
    return Math.abs(v) >= 100 ? v.toFixed(0) : v.toFixed(3);
  }
  // Color-scale transform: heavy-tailed statistics use log10(1 + x).
  function fwd(meta, v) { return meta.scale === "log" ? Math.log10(1 + Math.max(v, 0)) : v; }
  function inv(meta, x) { return meta.scale === "log" ? Math.pow(10, x) - 1 : x; }
  // Statistic value -> position on the color scale in [0, 1] (1 = dark = far from the model).
  function position(meta, v) {
    if (v === null || v === undefined || (meta.key === "rank" && v < 0)) return null;
    var lo = fwd(meta, meta.lo), hi = fwd(meta, meta.hi);
    var t = (fwd(meta, v) - lo) / ((hi - lo) || 1);
    return meta.lower_is_better ? t : 1 - t;
  }

  var tip = null;
  function tooltip() {
    if (!tip) {
      tip = el("div", "lf-tip");
      tip.setAttribute("role", "tooltip");
      tip.hidden = true;
      document.body.appendChild(tip);
    }
    return tip;
  }

  function Widget(root, data) {
    this.root = root;
    this.d = data;
    this.state = { lens: data.lens, compare: data.compare || "", stat: data.stat };
    this.build();
    this.render();
  }

  Widget.prototype.meta = function () {
    var key = this.state.stat;
    return this.d.stats.filter(function (s) { return s.key === key; })[0];
  };

  Widget.prototype.select = function (cls, label, options, value, onChange) {
    var wrap = el("label", "lf-control", label + " ");
    var s = el("select", cls);
    options.forEach(function (o) {
      var opt = el("option", null, o[1]);
      opt.value = o[0];
      s.appendChild(opt);
    });
    s.value = value;
    s.addEventListener("change", function () { onChange(s.value); });
    wrap.appendChild(s);
    return wrap;
  };

  Widget.prototype.build = function () {
    var self = this, d = this.d;
    var lensOpts = Object.keys(d.lenses).map(function (n) { return [n, n]; });
    var bar = el("div", "lf-controls");
    bar.appendChild(this.select("lf-lens", "lens", lensOpts, this.state.lens,
      function (v) { self.state.lens = v; self.render(); }));
    bar.appendChild(this.select("lf-compare", "compare with", [["", "\u2014 none \u2014"]]
      .concat(lensOpts), this.state.compare,
      function (v) { self.state.compare = v; self.render(); }));
    bar.appendChild(this.select("lf-stat", "color by",
      d.stats.map(function (s) { return [s.key, s.label]; }), this.state.stat,
      function (v) { self.state.stat = v; self.render(); }));
    this.legend = el("div", "lf-legend");
    bar.appendChild(this.legend);
    this.root.appendChild(bar);
    this.panels = el("div", "lf-panels");
    this.root.appendChild(this.panels);
    this.root.appendChild(el("div", "lf-note",
      "Rows: the lens applied to the residual stream entering each layer; top row " +
      "\u201cout\u201d is the model's own output. Cells show the top-1 token (bold: same " +
      "as the model's output). Hover a cell for the top-" + d.top_k + ". " +
      "\u2423 space, \u21b5 newline, \u21e5 tab."));
  };

  Widget.prototype.render = function () {
    var names = [this.state.lens];
    if (this.state.compare && this.state.compare !== this.state.lens) names.push(this.state.compare);
    this.panels.textContent = "";
    this.panels.classList.toggle("lf-compare-on", names.length > 1);
    var scrollers = [];
    for (var i = 0; i < names.length; i++) {
      var panel = this.panel(names[i]);
      this.panels.appendChild(panel);
      scrollers.push(panel.querySelector(".lf-scroll"));
    }
    syncScroll(scrollers);
    this.drawLegend();
  };

  Widget.prototype.panel = function (name) {
    var d = this.d, meta = this.meta(), lens = d.lenses[name];
    var R = d.layers.length, T = d.tokens.length;
    var panel = el("div", "lf-panel");
    panel.dataset.lens = name;
    panel.appendChild(el("div", "lf-panel-title", name));
    var scroll = el("div", "lf-scroll");
    var table = el("table", "lf-grid");
    var head = el("thead"), tr = el("tr");
    tr.appendChild(el("th", "lf-corner", "next \u2192"));
    for (var t = 0; t < T; t++) {
      var nxt = d.next[t];
      var th = el("th", "lf-next", nxt === null ? "" : shorten(nxt, CELL_CHARS));
      th.title = nxt === null ? "(end)" : nxt;
      tr.appendChild(th);
    }
    head.appendChild(tr);
    table.appendChild(head);
    var body = el("tbody");
    var stat = lens.stats[meta.key];
    var finalTop = lens.top_ids[R - 1];
    for (var r = R - 1; r >= 0; r--) {
      var row = el("tr");
      row.appendChild(el("th", "lf-layer", d.layers[r]));
      for (t = 0; t < T; t++) {
        var id = lens.top_ids[r][t][0];
        var td = el("td", "lf-cell", shorten(d.vocab[id], CELL_CHARS));
        var p = position(meta, stat[r][t]);
        var c = p === null ? MISSING : colorAt(p);
        td.style.background = css(c);
        td.style.color = ink(c);
        if (r < R - 1 && id === finalTop[t][0]) td.classList.add("lf-match");
        if (r === R - 1) td.classList.add("lf-out");
        td.dataset.r = r;
        td.dataset.t = t;
        row.appendChild(td);
      }
      body.appendChild(row);
    }
    table.appendChild(body);
    var foot = el("tfoot");
    tr = el("tr");
    tr.appendChild(el("th", "lf-corner", "input"));
    for (t = 0; t < T; t++) {
      var inp = el("th", "lf-input", shorten(d.tokens[t], CELL_CHARS));
      inp.title = d.tokens[t];
      tr.appendChild(inp);
    }
    foot.appendChild(tr);
    table.appendChild(foot);
    scroll.appendChild(table);
    panel.appendChild(scroll);
    var self = this;
    table.addEventListener("mouseover", function (ev) {
      var cell = ev.target.closest ? ev.target.closest("td.lf-cell") : null;
      if (cell) self.showTip(name, +cell.dataset.r, +cell.dataset.t, ev);
    });
    table.addEventListener("mousemove", function (ev) { place(ev); });
    table.addEventListener("mouseleave", function () { tooltip().hidden = true; });
    return panel;
  };

  Widget.prototype.showTip = function (name, r, t, ev) {
    var d = this.d, lens = d.lenses[name], box = tooltip();
    box.textContent = "";
    box.appendChild(el("div", "lf-tip-head",
      name + " \u00b7 layer " + d.layers[r] + " \u00b7 position " + t));
    var ctx = el("div", "lf-tip-ctx");
    ctx.appendChild(el("span", "lf-k", "input "));
    ctx.appendChild(el("code", null, d.tokens[t]));
    ctx.appendChild(el("span", "lf-k", "  true next "));
    ctx.appendChild(el("code", null, d.next[t] === null ? "(end)" : d.next[t]));
    box.appendChild(ctx);
    var top = el("table", "lf-tip-top");
    var ids = lens.top_ids[r][t], probs = lens.top_probs[r][t];
    for (var i = 0; i < ids.length; i++) {
      var row = el("tr", "lf-tip-row");
      row.appendChild(el("td", "lf-tip-rank", i + 1));
      row.appendChild(el("td", "lf-tip-tok", d.vocab[ids[i]]));
      var barCell = el("td", "lf-tip-barcell"), bar = el("div", "lf-tip-bar");
      bar.style.width = Math.max(1, Math.round(probs[i] * 100)) + "%";
      barCell.appendChild(bar);
      row.appendChild(barCell);
      row.appendChild(el("td", "lf-tip-p", (probs[i] * 100).toFixed(1) + "%"));
      top.appendChild(row);
    }
    box.appendChild(top);
    var stats = el("div", "lf-tip-stats");
    d.stats.forEach(function (s) {
      stats.appendChild(el("div", null, s.short + ": " + fmt(lens.stats[s.key][r][t], s.key)));
    });
    box.appendChild(stats);
    box.hidden = false;
    place(ev);
  };

  function place(ev) {
    var box = tooltip();
    if (box.hidden || !ev) return;
    var x = ev.clientX + 14, y = ev.clientY + 14;
    var w = box.offsetWidth, h = box.offsetHeight;
    if (x + w > window.innerWidth - 4) x = Math.max(4, ev.clientX - w - 14);
    if (y + h > window.innerHeight - 4) y = Math.max(4, ev.clientY - h - 14);
    box.style.left = x + "px";
    box.style.top = y + "px";
  }

  function syncScroll(scrollers) {
    var busy = false;
    scrollers.forEach(function (s) {
      s.addEventListener("scroll", function () {
        if (busy) return;
        busy = true;
        scrollers.forEach(function (o) {
          if (o !== s) { o.scrollLeft = s.scrollLeft; o.scrollTop = s.scrollTop; }
        });
        busy = false;
      });
    });
  }

  Widget.prototype.drawLegend = function () {
    var meta = this.meta(), n = 24, stops = [];
    var flo = fwd(meta, meta.lo), fhi = fwd(meta, meta.hi);
    for (var i = 0; i <= n; i++) {
      var v = inv(meta, flo + (fhi - flo) * i / n);
      stops.push(css(colorAt(position(meta, v))) + " " + (100 * i / n).toFixed(1) + "%");
    }
    var lo = meta.lo, hi = meta.hi;
    this.legend.textContent = "";
    this.legend.appendChild(el("span", "lf-legend-lo", fmt(lo, meta.key)));
    var grad = el("span", "lf-legend-bar");
    grad.style.background = "linear-gradient(to right, " + stops.join(", ") + ")";
    this.legend.appendChild(grad);
    this.legend.appendChild(el("span", "lf-legend-hi",
      (meta.clipped ? "\u2265 " : "") + fmt(hi, meta.key)));
    this.legend.appendChild(el("span", "lf-legend-label",
      meta.label + (meta.scale === "log" ? " (log scale)" : "")));
  };

  function init() {
    var roots = document.querySelectorAll(".lf-traj");
    window.lensforgeWidgets = [];
    for (var i = 0; i < roots.length; i++) {
      var src = roots[i].querySelector("script.lf-data");
      if (!src || roots[i].dataset.ready) continue;
      roots[i].dataset.ready = "1";
      window.lensforgeWidgets.push(new Widget(roots[i], JSON.parse(src.textContent)));
    }
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
