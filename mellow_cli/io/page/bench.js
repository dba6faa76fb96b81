// The page of benchmark predictions (`mellow report PREDICTIONS.json...`): per file (a model) the
// overall accuracy, bars per task, difficulty and sub-category side by side, and every item with
// each model's output, right or wrong.

const BENCH = pageData();

function svg(tag, attrs, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function accuracyText(acc) { return acc.accuracy === null ? "–" : `${acc.accuracy.toFixed(2)}%`; }

// Horizontal bars, one group of bars (one per model) for each category, 0 to 100%.
function barChart(categories, value) {
  const models = BENCH.models, width = 900, left = 190, right = 70, bar = 12, gap = 10;
  const rowHeight = models.length * bar + gap, top = 20, height = top + categories.length * rowHeight + 4;
  const x = (p) => left + (p / 100) * (width - left - right);
  const chart = svg("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, width: "100%", role: "img" });
  for (const p of [0, 25, 50, 75, 100]) {
    chart.append(svg("line", { class: "axis", x1: x(p), x2: x(p), y1: top - 4, y2: height, "stroke-dasharray": p ? "3 3" : "" }),
      svg("text", { x: x(p), y: 12, "text-anchor": "middle", class: "value" }, `${p}%`));
  }
  categories.forEach((name, i) => {
    const y0 = top + i * rowHeight;
    chart.append(svg("text", { x: left - 8, y: y0 + (models.length * bar) / 2 + 4, "text-anchor": "end" }, name.length > 28 ? `${name.slice(0, 27)}…` : name));
    models.forEach((m, k) => {
      const acc = value(m, name);
      if (!acc) return;
      const y = y0 + k * bar, p = acc.accuracy || 0;
      chart.append(svg("rect", { x: x(0), y, width: Math.max(0, x(p) - x(0)), height: bar - 2, fill: PALETTE[k % PALETTE.length], rx: 2 },
        svg("title", {}, `${m.label} · ${name}: ${accuracyText(acc)} (${acc.correct} of ${acc.scored})`)),
      svg("text", { x: x(p) + 4, y: y + bar - 4, class: "value" }, `${accuracyText(acc)} · ${acc.scored}`));
    });
  });
  return chart;
}

function legend() {
  return el("div", { class: "legend" }, BENCH.models.map((m, k) =>
    el("span", {}, el("span", { class: "swatch", style: { background: PALETTE[k % PALETTE.length] } }), m.label)));
}

function groupChart(group) {
  const names = [];
  for (const m of BENCH.models) for (const [name] of m.groups[group] || []) if (!names.includes(name)) names.push(name);
  const value = (m, name) => {
    const found = (m.groups[group] || []).find((row) => row[0] === name);
    return found ? { accuracy: found[1], correct: found[2], scored: found[3] } : null;
  };
  return el("section", {}, el("h2", { text: `accuracy by ${group}` }), barChart(names, value));
}

function cards() {
  return el("div", { class: "cards" }, BENCH.models.map((m, k) => el("div", { class: "card" },
    el("div", {}, el("span", { class: "swatch", style: { background: PALETTE[k % PALETTE.length] } }), el("strong", { text: m.label })),
    el("div", { class: "big", text: accuracyText(m.overall) }),
    el("div", { class: "muted", text: `${m.overall.correct} of ${m.overall.scored} right` }),
    el("div", { class: "muted", text: `answered ${m.counts.answered}, unanswered ${m.counts.unanswered}, skipped ${m.counts.skipped}` }),
    el("div", { class: "muted", text: `${m.file}${m.mode ? ` · mode ${m.mode}` : ""}${m.prompt_style && m.prompt_style !== "plain" ? ` · prompt ${m.prompt_style}` : ""}` }))));
}

function itemsTable() {
  const groups = [...new Set(BENCH.items.flatMap((it) => Object.keys(it.groups)))].filter((g) => g !== "category" && g !== "dataset");
  const columns = [{ label: "id" }, ...groups.map((g) => ({ label: g })), { label: "question" }, { label: "answer" },
    ...BENCH.models.map((m) => ({ label: m.label }))];
  const rows = BENCH.items.map((it) => {
    const outputs = BENCH.models.map((m, k) => {
      const right = it.right[k], text = it.outputs[k] ?? (it.errors[k] ? `(${it.errors[k]})` : "");
      return el("span", { class: right === true ? "good" : right === false ? "error" : "muted", text: `${right === true ? "✓ " : right === false ? "✗ " : ""}${text}` });
    });
    const cells = [it.key, ...groups.map((g) => [].concat(it.groups[g] ?? "").join(", ")), it.question, it.answer ?? "", ...outputs];
    const row = { item: it, cells, sort: [it.key, ...groups.map((g) => String(it.groups[g] ?? "")), it.question, it.answer,
      ...it.right.map((r) => (r === null ? null : Number(r)))] };
    return row;
  });
  const choose = el("select", {}, ["every item", "any model wrong", "every model wrong", "the models disagree"].map((t) => el("option", { text: t })));
  const also = ({ item }) => {
    const known = item.right.filter((r) => r !== null);
    return [true, item.right.includes(false), known.length > 0 && known.every((r) => r === false),
      new Set(item.right.map(String)).size > 1][choose.selectedIndex];
  };
  const table = sortableTable(columns, rows, { placeholder: "filter the items", also });
  choose.addEventListener("change", table.apply);
  return el("section", {}, el("h2", { text: "items" }), el("div", { class: "bar" }, table.filter, choose, table.shown),
    el("div", { class: "scroll", style: { maxHeight: "640px" } }, table.table));
}

(function main() {
  const app = document.getElementById("app");
  const groups = [...new Set(BENCH.models.flatMap((m) => Object.keys(m.groups)))];
  app.append(el("h1", { text: BENCH.title }), el("p", { class: "sub", text: `scored with the ${BENCH.scorer}` }), cards(),
    el("h2", { text: "overall accuracy" }), legend(), barChart(["overall"], (m) => m.overall),
    ...groups.map(groupChart), itemsTable());
  document.body.dataset.ready = "1";
})();
