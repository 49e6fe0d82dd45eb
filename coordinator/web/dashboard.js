// The fedbe coordinator's dashboard: polls /status.json and draws it (coordinator/dashboard.py).
// Every string that comes from the document (client ids, profiles, reasons: devices send them) is
// inserted with textContent or setAttribute, never parsed as HTML.
"use strict";

(() => {
  const POLL_MS = 3000;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const TOKEN_KEY = "fedbe-token";
  const $ = (id) => document.getElementById(id);

  // -- the token: once from #token=..., then from this tab's sessionStorage ---------------------
  function takeToken() {
    const found = /(?:^#|&)token=([^&]*)/.exec(location.hash);
    if (found) {
      sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(found[1]));
      // out of the address bar (and so out of bookmarks and screenshots)
      history.replaceState(null, "", location.pathname + location.search);
    }
    return sessionStorage.getItem(TOKEN_KEY);
  }

  // -- building elements ------------------------------------------------------------------------
  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function titled(node, text) {
    node.appendChild(svg("title", {}, text));
    return node;
  }

  function fill(parent, ...children) {
    parent.replaceChildren(...children);
  }

  // -- formatting -------------------------------------------------------------------------------
  function ago(iso, now) {
    if (!iso) return "-";
    const s = Math.max(0, (now - Date.parse(iso)) / 1000);
    if (s < 90) return `${Math.round(s)} s`;
    if (s < 5400) return `${Math.round(s / 60)} min`;
    if (s < 172800) return `${(s / 3600).toFixed(1)} h`;
    return `${Math.round(s / 86400)} d`;
  }

  function bytes(n) {
    if (n === null || n === undefined) return "-";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let i = 0;
    while (Math.abs(n) >= 1000 && i < units.length - 1) {
      n /= 1000;
      i += 1;
    }
    return `${n.toFixed(n >= 100 || i === 0 ? 0 : 1)} ${units[i]}`;
  }

  const num = (digits) => (v) => (v === null || v === undefined ? "-" : Number(v).toFixed(digits));

  // -- the header and the round -----------------------------------------------------------------
  function message(text) {
    const m = $("message");
    m.textContent = text || "";
    m.hidden = !text;
  }

  function renderHeader(doc, now) {
    const c = doc.coordinator || {};
    $("federation").textContent = c.federation ? `federation ${c.federation}` : "";
    $("coordinator").textContent =
      `coordinator ${c.state || "?"} on ${c.host || "?"} (pid ${c.pid ?? "?"}), started ${ago(c.started, now)} ago; ` +
      `updated ${ago(doc.updated, now)} ago, heartbeat ${ago(doc.heartbeat, now)} ago`;
  }

  function renderRound(r) {
    const deadline = r.seconds_to_deadline;
    const parts = [
      `round ${r.number} of ${r.of}: ${r.phase}`,
      `${r.arrived}/${r.expected} updates arrived`,
      `${r.errors} errors`,
      `${r.rejected} rejected`,
    ];
    if (deadline !== null && deadline !== undefined) parts.push(`${Math.round(deadline)} s to the deadline`);
    $("round-line").textContent = parts.join(" · ");
    const bar = $("round-progress");
    const width = 600;
    const expected = Math.max(r.expected || 0, 1);
    const shares = [
      ["arrived", r.arrived || 0],
      ["errors", r.errors || 0],
      ["rejected", r.rejected || 0],
    ];
    const nodes = [svg("rect", { class: "track", x: 0, y: 0, width, height: 22, rx: 3 })];
    let x = 0;
    for (const [cls, count] of shares) {
      const w = Math.min((count / expected) * width, width - x);
      if (w > 0) nodes.push(titled(svg("rect", { class: cls, x, y: 0, width: w, height: 22 }), `${count} ${cls}`));
      x += Math.max(w, 0);
    }
    nodes.push(svg("text", { x: width / 2, y: 15, "text-anchor": "middle" }, `${r.arrived}/${r.expected}`));
    fill(bar, ...nodes);
  }

  // -- the fleet table ---------------------------------------------------------------------------
  function renderFleet(devices, now) {
    const rows = devices.map((d) => {
      const tr = el("tr", { "data-client": d.id, class: `state-${d.state}` });
      const fate = d.last_update;
      const fateText = fate ? `r${fate.round} ${fate.fate}${fate.code ? ` (${fate.code})` : ""}` : "-";
      const cells = [
        [d.id],
        [d.profile ?? "-"],
        [d.device_kind ?? "-"],
        [d.precision ?? "-"],
        [d.state, d.refused ? { class: "state", title: `refused: ${d.refused}` } : { class: "state" }],
        [ago(d.since, now), d.since ? { title: d.since } : {}],
        [d.last_round ?? "-"],
        [(d.blocks || []).length ? d.blocks.join(",") : "-", { class: "blocks" }],
        [fateText, fate ? { class: `fate-${fate.fate}` } : {}],
      ];
      for (const [text, attrs] of cells) tr.appendChild(el("td", attrs, text));
      return tr;
    });
    if (!rows.length) rows.push(el("tr", {}, "no client has announced itself yet"));
    fill(document.querySelector("#fleet tbody"), ...rows);
  }

  // -- the allocation map: a column group per round, a column per block, a row per client --------
  function allocationRounds(doc) {
    // round 0 is the base model's evaluation: nothing was allocated
    const rounds = (doc.recent_rounds || []).filter((r) => r.round > 0)
      .map((r) => ({ round: r.round, open: false, assignments: r.assignments || {} }));
    const r = doc.round || {};
    const last = rounds.length ? rounds[rounds.length - 1].round : 0;
    if ((r.phase === "training" || r.phase === "closing") && r.number > last) {
      const live = {};
      for (const d of doc.devices || []) if ((d.blocks || []).length) live[d.id] = d.blocks;
      rounds.push({ round: r.number, open: true, assignments: live });
    }
    return rounds;
  }

  function renderAllocation(doc) {
    const box = $("allocation");
    const rounds = allocationRounds(doc);
    const clients = new Set((doc.devices || []).map((d) => d.id));
    let maxBlock = -1;
    for (const r of rounds) {
      for (const [cid, blocks] of Object.entries(r.assignments)) {
        clients.add(cid);
        for (const b of blocks) maxBlock = Math.max(maxBlock, b);
      }
    }
    if (!rounds.length || maxBlock < 0) {
      fill(box, el("p", { class: "empty" }, "no round has assigned blocks yet"));
      return;
    }
    const ids = [...clients].sort();
    const blocks = maxBlock + 1;
    const label = Math.min(14 + 7 * Math.max(...ids.map((c) => c.length)), 220);
    const gap = 8;
    const cell = Math.max(5, Math.min(18, Math.floor((1180 - label) / (rounds.length * blocks + rounds.length * 0.5))));
    const top = 30;
    const width = label + rounds.length * (blocks * cell + gap);
    const height = top + ids.length * cell + 4;
    const map = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, class: "allocation", role: "img" });
    ids.forEach((cid, i) => {
      map.appendChild(svg("text", { x: label - 6, y: top + i * cell + cell * 0.75, "text-anchor": "end", class: "label" }, cid));
    });
    rounds.forEach((r, k) => {
      const x0 = label + k * (blocks * cell + gap);
      const head = svg("text", { x: x0 + (blocks * cell) / 2, y: 12, "text-anchor": "middle", class: r.open ? "label open" : "label" },
        r.open ? `r${r.round} (open)` : `r${r.round}`);
      map.appendChild(head);
      if (cell >= 10) {
        for (let b = 0; b < blocks; b += 1) {
          map.appendChild(svg("text", { x: x0 + b * cell + cell / 2, y: top - 5, "text-anchor": "middle", class: "tick" }, b));
        }
      }
      ids.forEach((cid, i) => {
        const held = new Set(r.assignments[cid] || []);
        for (let b = 0; b < blocks; b += 1) {
          const on = held.has(b);
          const rect = svg("rect", {
            x: x0 + b * cell, y: top + i * cell, width: cell - 1, height: cell - 1,
            class: `cell ${on ? "on" : "off"}${r.open ? " open" : ""}`,
            "data-round": r.round, "data-client": cid, "data-block": b,
          });
          map.appendChild(titled(rect, `round ${r.round}, ${cid}, block ${b}: ${on ? "trains it" : "-"}`));
        }
      });
    });
    fill(box, map);
  }

  // -- per-round line charts --------------------------------------------------------------------
  function lineChart(box, series, format, fixed) {
    const points = series.flatMap((s) => s.points);
    if (!points.length) {
      fill(box, el("p", { class: "empty" }, "no data for these rounds"));
      return;
    }
    const W = 400, H = 210, L = 56, R = 10, T = 10, B = 50;
    const xs = points.map((p) => p.x), ys = points.map((p) => p.y);
    const x0 = Math.min(...xs), x1 = Math.max(...xs);
    let y0 = fixed ? Math.min(fixed[0], ...ys) : Math.min(...ys);
    let y1 = fixed ? Math.max(fixed[1], ...ys) : Math.max(...ys);
    if (y1 - y0 < 1e-9) {
      const pad = Math.abs(y1) * 0.1 || 1;
      y0 -= pad;
      y1 += pad;
    }
    const px = (x) => (x1 === x0 ? L + (W - L - R) / 2 : L + ((x - x0) / (x1 - x0)) * (W - L - R));
    const py = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
    const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "line-chart", role: "img" });
    for (let i = 0; i <= 4; i += 1) {
      const y = y0 + ((y1 - y0) * i) / 4;
      chart.appendChild(svg("line", { x1: L, x2: W - R, y1: py(y), y2: py(y), class: "grid" }));
      chart.appendChild(svg("text", { x: L - 4, y: py(y) + 4, "text-anchor": "end", class: "tick" }, format(y)));
    }
    for (const x of [...new Set(xs)].sort((a, b) => a - b)) {
      chart.appendChild(svg("text", { x: px(x), y: H - B + 14, "text-anchor": "middle", class: "tick" }, x));
    }
    chart.appendChild(svg("text", { x: (L + W - R) / 2, y: H - B + 27, "text-anchor": "middle", class: "tick" }, "round"));
    series.forEach((s, k) => {
      const cls = `series s${k}`;
      const pts = [...s.points].sort((a, b) => a.x - b.x);
      if (pts.length > 1) {
        chart.appendChild(svg("polyline", { points: pts.map((p) => `${px(p.x)},${py(p.y)}`).join(" "), class: cls }));
      }
      for (const p of pts) {
        const dot = svg("circle", { cx: px(p.x), cy: py(p.y), r: 3, class: cls, "data-round": p.x, "data-value": p.y });
        chart.appendChild(titled(dot, `${s.name}, round ${p.x}: ${format(p.y)}`));
      }
      chart.appendChild(svg("rect", { x: L + 4 + k * 110, y: H - 9, width: 10, height: 4, class: `${cls} key` }));
      chart.appendChild(svg("text", { x: L + 18 + k * 110, y: H - 4, class: "tick" }, s.name));
    });
    fill(box, chart);
  }

  function renderCharts(recent) {
    const pick = (key) => recent.filter((r) => r[key] !== null && r[key] !== undefined).map((r) => ({ x: r.round, y: r[key] }));
    const sources = [...new Set(recent.map((r) => r.accuracy_source).filter(Boolean))].join(", ");
    lineChart($("chart-accuracy"), [{ name: `accuracy${sources ? ` (${sources})` : ""}`, points: pick("accuracy") }], num(3), [0, 1]);
    const probes = [...new Set(recent.flatMap((r) => Object.keys(r.retention || {})))].sort();
    const retention = probes.map((probe) => ({
      name: probe,
      points: recent.filter((r) => (r.retention || {})[probe] !== undefined).map((r) => ({ x: r.round, y: r.retention[probe] })),
    }));
    lineChart($("chart-retention"), retention, num(3));
    lineChart($("chart-bytes"), [{ name: "up", points: pick("bytes_up") }, { name: "down", points: pick("bytes_down") }], bytes, [0, 0]);
  }

  // -- polling ----------------------------------------------------------------------------------
  function render(doc) {
    const now = Date.now();
    renderHeader(doc, now);
    renderRound(doc.round || {});
    renderFleet(doc.devices || [], now);
    renderAllocation(doc);
    renderCharts(doc.recent_rounds || []);
  }

  async function poll(token) {
    let res;
    try {
      res = await fetch("status.json", { headers: token ? { Authorization: `Bearer ${token}` } : {}, cache: "no-store" });
    } catch (err) {
      message(`can not reach the coordinator (${err.message}); it may have finished or stopped`);
      return;
    }
    if (res.status === 401) {
      message(token
        ? "unauthorized: the coordinator refused this token; open the page as /#token=TOKEN with the token of http.token_file"
        : "unauthorized: this coordinator needs a token; add #token=TOKEN to the URL (the token of http.token_file)");
      document.body.classList.add("unauthorized");
      return;
    }
    if (!res.ok) {
      message(`/status.json answered ${res.status}`);
      return;
    }
    const doc = await res.json();
    message("");
    document.body.classList.remove("unauthorized");
    render(doc);
  }

  async function loop() {
    const token = takeToken();
    for (;;) {
      try {
        await poll(token);
      } catch (err) {
        message(`can not show /status.json: ${err.message}`);
      }
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
  }

  loop();
})();
