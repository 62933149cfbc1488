"use strict";
// Comparing runs (`archer-async dashboard RUN_DIR RUN_DIR ...`), loaded by dashboard.html before its own
// script and calling its helpers (drawLines, legend, stepSeries, ...) at render time. Every plot overlays
// one line per run in the run's colour, labelled by the run's name: a panel of several metrics gets a
// tab per metric; per-actor plots draw each actor in its run's colour; the header lists the runs, their
// status and the config values that differ between them (the rest of the config once, as chips).

const RUN_COLORS = ["#60a5fa", "#f472b6", "#34d399", "#fbbf24", "#a78bfa", "#22d3ee", "#fb923c", "#a3e635",
                    "#f87171", "#e879f9"];
function runColor(i) { return i < RUN_COLORS.length ? RUN_COLORS[i] : `hsl(${(i * 137.5) % 360}, 70%, 66%)`; }

const COMPARE_SUB = {
  tput: "tokens/s of each run by elapsed time: trained (learner) or generated (all actors)",
  stale: "share of the last 10 steps' samples per version lag, one line per run",
  inflight: "per actor, in its run's colour · legend: the run's total now",
  idle: "per actor, in its run's colour · legend: the run's mean now",
  share: "per actor, in its run's colour · legend: the run's largest share now (1/N when fair)",
};
const AGG = {inflight: "sum", idle: "mean", share: "max"};

function setupCompare() {
  $("run-name").textContent = `· comparing ${S.runs.length} runs`;
  $("run-dir").textContent = S.runs.map((R) => R.label).join("  ·  ");
  $("run-dir").title = S.runs.map((R) => R.label).join("\n");
  document.querySelector(".stats").style.display = "none";
  for (const p of PANELS) {
    if (p.section) continue;
    if (COMPARE_SUB[p.id]) p.el.querySelector(".sub").textContent = COMPARE_SUB[p.id];
    p.metrics = p.kind === "throughput"
      ? [["learner/tokens_per_s", "trained (learner)"], ["actor/tokens_per_s", "generated (all actors)"]]
      : p.series ? p.series.map(([k, label]) => [k, label]) : null;
    p.sel = p.metrics ? p.metrics[0][0] : null;
    if (!p.metrics || p.metrics.length < 2) continue;
    const tabs = document.createElement("div"); tabs.className = "tabs";
    for (const [k, label] of p.metrics) {
      const b = document.createElement("button");
      b.className = "tab" + (k === p.sel ? " on" : ""); b.textContent = label; b.dataset.key = k; b.title = k;
      b.addEventListener("click", () => {
        p.sel = k;
        for (const t of tabs.children) t.classList.toggle("on", t.dataset.key === k);
        render(p);
      });
      tabs.append(b);
    }
    p.el.querySelector(".sub").after(tabs);
    p.tabs = tabs;
  }
}

function timeSeries(R, key) {  // [elapsed s since the run's start, value] of the run's step rows
  const base = t0(R);
  return R.rows.filter((r) => isNum(r[key]) && isNum(r.time)).map((r) => [r.time - base, r[key]]);
}
function aggregate(values, how) {
  if (!values.length) return null;
  if (how === "max") return Math.max(...values);
  const sum = values.reduce((a, b) => a + b, 0);
  return how === "sum" ? sum : sum / values.length;
}

function renderCompare(only) {
  for (const p of PANELS) {
    if (p.section || (only && only !== p)) continue;
    if (p.tabs) for (const t of p.tabs.children) {  // an optional metric no run logs gets no tab
      t.hidden = (p.optional || []).includes(t.dataset.key) &&
                 !S.runs.some((R) => R.rows.some((r) => isNum(r[t.dataset.key])));
    }
    let series = [], items = [], spec;
    if (p.kind === "throughput") {
      series = S.runs.map((R) => ({label: R.label, color: R.color, pts: timeSeries(R, p.sel), width: 2}));
      spec = {time: true, zero: true};
    } else if (p.kind === "actor" || p.kind === "share") {
      for (const R of S.runs) {
        const base = t0(R), groups = actorGroups(R), shares = p.kind === "share" ? sampleShares(R) : null, now = [];
        for (const [id, rows] of groups) {
          const pts = shares ? (shares.series.get(id) || []).map(([t, v]) => [t - base, v])
            : rows.filter((r) => isNum(r[p.key]) && isNum(r.time)).map((r) => [r.time - base, r[p.key]]);
          series.push({label: `${R.label} · actor ${id}`, color: R.color, pts, width: 1.4});
          if (pts.length) now.push(last(pts));
        }
        items.push([R.color, `${R.label} (${groups.length} actor${groups.length === 1 ? "" : "s"})`,
                    fmt(aggregate(now, AGG[p.id]))]);
      }
      spec = {time: true, zero: true};
    } else if (p.kind === "hist") {
      for (const R of S.runs) {
        const acc = recentHist(R), total = [...acc.values()].reduce((a, b) => a + b, 0);
        const pts = total ? [...acc.keys()].sort((a, b) => a - b).map((k) => [k, acc.get(k) / total]) : [];
        series.push({label: R.label, color: R.color, pts, width: 2});
        const lr = R.rows[R.rows.length - 1] || {};
        items.push([R.color, `${R.label} mean lag`, fmt(lr["staleness/mean"])]);
      }
      spec = {zero: true, markers: true, xlabel: p.xlabel, xname: "lag", ylabel: "fraction of samples"};
    } else {
      series = S.runs.map((R) => ({label: R.label, color: R.color, pts: stepSeries(R, p.sel)}));
      const doms = S.runs.map(stepDomain).filter(Boolean);
      spec = {zero: p.zero, markers: p.markers,
              xDomain: doms.length ? [Math.min(...doms.map((d) => d[0])), Math.max(...doms.map((d) => d[1]))] : null};
    }
    if (!items.length) items = series.map((s) => [s.color, s.label, fmt(last(s.pts))]);
    legend(p.lg, items);
    drawLines(p.cv, {ylabel: p.ylabel, ...spec, series});
    p.cv.dataset.series = String(series.filter((s) => s.pts.length).length);
    p.cv.dataset.runs = String(new Set(series.filter((s) => s.pts.length).map((s) => s.color)).size);
  }
}

function compareBodyData() {
  const d = document.body.dataset;
  d.runs = String(S.runs.length);
  d.step = S.runs.map((R) => { const lr = R.rows[R.rows.length - 1]; return lr && isNum(lr.step) ? lr.step : -1; }).join(",");
  d.rows = String(S.runs.reduce((a, R) => a + R.rows.length, 0));
  d.actorRows = String(S.runs.reduce((a, R) => a + R.arows.length, 0));
}

function chip(label, value, key, color) {
  const d = document.createElement("span"); d.className = "chip"; d.title = key;
  const b = document.createElement("b"); b.textContent = String(value);
  if (color) b.style.color = color;
  d.append(label + " ", b);
  return d;
}
function metric(parent, text, value, after) {
  const m = document.createElement("span"); m.className = "m";
  const b = document.createElement("b"); b.textContent = value;
  m.append(text ? text + " " : "", b, after || ""); parent.append(m);
}

function renderHeaderCompare() {
  const cfgs = S.runs.map((R) => new Map(((R.run && R.run.config) || []).map((c) => [c.key, c])));
  const keys = [...new Set(cfgs.flatMap((m) => [...m.keys()]))];
  const differs = new Set(keys.filter((k) => new Set(cfgs.map((m) => m.has(k) ? JSON.stringify(m.get(k).value) : "–")).size > 1));
  const cfg = $("h-config"); cfg.innerHTML = "";
  for (const k of keys) if (!differs.has(k)) { const c = cfgs[0].get(k) || cfgs.find((m) => m.has(k)).get(k); cfg.append(chip(c.label, c.value, k)); }
  $("h-actors").innerHTML = "";
  const box = $("h-runs"); box.innerHTML = "";
  const errors = [];
  S.runs.forEach((R, i) => {
    const r = R.run || {}, row = document.createElement("div");
    row.className = "runrow"; row.dataset.label = R.label;
    const sw = document.createElement("span"); sw.className = "sw"; sw.style.background = R.color;
    const name = document.createElement("b"); name.textContent = R.label; name.style.color = R.color; name.title = r.run_dir || "";
    const pill = document.createElement("span"); pill.className = "pill " + (r.status || "");
    pill.innerHTML = "<i></i>"; pill.append(r.status || "loading");
    row.append(sw, name, pill);
    metric(row, "step", isNum(r.step) ? String(r.step) : "–", isNum(r.total_steps) ? ` / ${r.total_steps}` : "");
    metric(row, "version", isNum(r.version) ? String(r.version) : "–");
    metric(row, "elapsed", fmtDur(r.elapsed_s));
    const times = [R.rows[R.rows.length - 1], R.arows[R.arows.length - 1]].filter((x) => x && isNum(x.time)).map((x) => x.time);
    metric(row, "updated", times.length && isNum(r.now) ? fmtDur(r.now - Math.max(...times)) : "–", times.length ? " ago" : "");
    const actors = actorGroups(R);
    if (actors.length) {
      const tps = actors.map(([, rows]) => rows[rows.length - 1]["actor/tokens_per_s"]).filter(isNum);
      metric(row, "", String(actors.length), ` actor${actors.length === 1 ? "" : "s"} · ${fmt(aggregate(tps, "sum"))} tok/s`);
    }
    for (const k of keys) if (differs.has(k)) {
      const c = cfgs[i].get(k);
      row.append(chip(c ? c.label : cfgs.find((m) => m.has(k)).get(k).label, c ? c.value : "–", k, R.color));
    }
    box.append(row);
    if (r.error) errors.push(`${R.label}: ${r.error}`);
  });
  const live = S.runs.filter((R) => R.run && R.run.status === "live").length;
  const pill = $("h-status"); pill.className = "pill" + (live ? " live" : "");
  pill.querySelector("span").textContent = `${live} of ${S.runs.length} live`;
  const err = $("h-error"); err.hidden = !errors.length; err.textContent = errors.map((e) => "error: " + e).join("  ·  ");
  document.body.dataset.status = S.runs.map((R) => (R.run ? R.run.status : "loading")).join(",");
}
