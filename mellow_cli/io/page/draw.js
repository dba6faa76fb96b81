// Shared by every page: building elements, reading the page's data, times, colours, the picture
// of a recording (spectrogram or waveform) over a span of time, a time axis, and tables that sort
// by their headers and filter by a box. No library: the pages must open with no network.

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else if (key === "style") Object.assign(node.style, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key in node && typeof value !== "string") node[key] = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) node.append(child);
  }
  return node;
}

function pageData() { return JSON.parse(document.getElementById("page-data").textContent); }

function pageRows() {
  return document.getElementById("rows").textContent.split("\n").filter((l) => l.trim()).map((l) => JSON.parse(l));
}

// 75.25 -> "1:15", or "1:15.3" when `precise` and there is a tenth to show; hours when there are.
function clock(seconds, precise) {
  const tenths = Math.round(Math.max(0, seconds) * (precise ? 10 : 1)) / (precise ? 10 : 1);
  const h = Math.floor(tenths / 3600), m = Math.floor((tenths % 3600) / 60), rest = tenths % 60;
  const sec = String(Math.floor(rest)).padStart(2, "0") + (precise && rest % 1 ? `.${Math.round((rest % 1) * 10)}` : "");
  return h ? `${h}:${String(m).padStart(2, "0")}:${sec}` : `${m}:${sec}`;
}

function percent(p) { return p === null || p === undefined ? "–" : `${(100 * p).toFixed(p > 0.995 || p < 0.005 ? 1 : 0)}%`; }

const PALETTE = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#eeca3b", "#9d755d", "#ff9da6"];

function cssVar(name) { return getComputedStyle(document.documentElement).getPropertyValue(name).trim(); }

function bytesOf(b64) {
  const text = atob(b64), out = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i);
  return out;
}

// A canvas sized to its box in device pixels; drawing is then in CSS pixels.
function fitCanvas(canvas) {
  const ratio = window.devicePixelRatio || 1, w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * ratio) || canvas.height !== Math.round(h * ratio)) {
    canvas.width = Math.round(w * ratio);
    canvas.height = Math.round(h * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, w, h);
  return { ctx, w, h };
}

// Levels 0..255 to colours, dark to bright (an "inferno"-like ramp).
const RAMP = (() => {
  const stops = [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [250, 193, 39], [252, 255, 164]];
  const out = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) {
    const x = (i / 255) * (stops.length - 1), k = Math.min(stops.length - 2, Math.floor(x)), f = x - k;
    for (let c = 0; c < 3; c++) out[i * 3 + c] = stops[k][c] + f * (stops[k + 1][c] - stops[k][c]);
  }
  return out;
})();

// The picture of one recording: `columns` columns over `duration` seconds, each with `bands`
// spectrogram levels (lowest band first) and the lowest and highest sample (0..255).
class Picture {
  constructor({ duration, columns, bands = 0, spectrogram = null, peaks }) {
    this.duration = duration;
    this.columns = columns;
    this.bands = bands;
    this.levels = typeof spectrogram === "string" ? bytesOf(spectrogram) : spectrogram;
    this.peaks = typeof peaks === "string" ? bytesOf(peaks) : peaks;
    this.image = null;
  }

  // Only the envelope, from samples the browser decoded (the serve page).
  static fromSamples(samples, rate, columns) {
    const peaks = new Uint8Array(columns * 2), per = samples.length / columns;
    for (let c = 0; c < columns; c++) {
      let lo = 1, hi = -1;
      const end = Math.min(samples.length, Math.floor((c + 1) * per));
      for (let i = Math.floor(c * per); i < end; i++) { const v = samples[i]; if (v < lo) lo = v; if (v > hi) hi = v; }
      if (hi < lo) lo = hi = 0;
      peaks[2 * c] = Math.round((Math.max(-1, lo) + 1) * 127.5);
      peaks[2 * c + 1] = Math.round((Math.min(1, hi) + 1) * 127.5);
    }
    return new Picture({ duration: samples.length / rate, columns, peaks });
  }

  get hasSpectrogram() { return !!this.levels && this.bands > 0; }

  spectrogramImage() {
    if (!this.image) {
      const canvas = document.createElement("canvas");
      canvas.width = this.columns;
      canvas.height = this.bands;
      const ctx = canvas.getContext("2d"), img = ctx.createImageData(this.columns, this.bands);
      for (let c = 0; c < this.columns; c++) {
        for (let b = 0; b < this.bands; b++) {
          const v = this.levels[c * this.bands + b], at = ((this.bands - 1 - b) * this.columns + c) * 4;
          img.data[at] = RAMP[v * 3]; img.data[at + 1] = RAMP[v * 3 + 1]; img.data[at + 2] = RAMP[v * 3 + 2]; img.data[at + 3] = 255;
        }
      }
      ctx.putImageData(img, 0, 0);
      this.image = canvas;
    }
    return this.image;
  }

  // More columns than pixels: each pixel shows the loudest of its columns, band by band, so a
  // sound one column long is never averaged or sampled away.
  pooled(c0, c1, width) {
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = this.bands;
    const ctx = canvas.getContext("2d"), img = ctx.createImageData(width, this.bands);
    for (let x = 0; x < width; x++) {
      const a = Math.max(0, Math.floor(c0 + (x * (c1 - c0)) / width)), b = Math.min(this.columns, Math.max(a + 1, Math.floor(c0 + ((x + 1) * (c1 - c0)) / width)));
      for (let band = 0; band < this.bands; band++) {
        let v = 0;
        for (let c = a; c < b; c++) v = Math.max(v, this.levels[c * this.bands + band]);
        const at = ((this.bands - 1 - band) * width + x) * 4;
        img.data[at] = RAMP[v * 3]; img.data[at + 1] = RAMP[v * 3 + 1]; img.data[at + 2] = RAMP[v * 3 + 2]; img.data[at + 3] = 255;
      }
    }
    ctx.putImageData(img, 0, 0);
    return canvas;
  }

  // Draw the span [t0, t1] seconds into a w x h box of ctx.
  draw(ctx, w, h, t0, t1, mode) {
    const perColumn = this.duration / this.columns;
    const c0 = t0 / perColumn, c1 = t1 / perColumn;
    if (mode === "spectrogram" && this.hasSpectrogram) {
      const x0 = Math.max(0, c0), x1 = Math.min(this.columns, c1);
      if (x1 <= x0) return;
      ctx.imageSmoothingEnabled = false;
      if (x1 - x0 > w) ctx.drawImage(this.pooled(c0, c1, Math.round(w)), 0, 0, Math.round(w), this.bands, 0, 0, w, h);
      else ctx.drawImage(this.spectrogramImage(), x0, 0, x1 - x0, this.bands, ((x0 - c0) / (c1 - c0)) * w, 0, ((x1 - x0) / (c1 - c0)) * w, h);
      return;
    }
    // The envelope fills the height at the recording's loudest peak: a quiet field recording
    // still shows its shape (the spectrogram keeps the levels).
    if (this.gain === undefined) {
      let most = 0;
      for (const v of this.peaks) most = Math.max(most, Math.abs(v - 127.5));
      this.gain = most > 1 ? 127.5 / most : 1;
    }
    ctx.fillStyle = cssVar("--wave") || "#4c78a8";
    const mid = h / 2, step = Math.max(1, (c1 - c0) / w), gain = this.gain * 0.95;
    for (let x = 0; x < w; x++) {
      const a = Math.floor(c0 + (x * (c1 - c0)) / w), b = Math.max(a + 1, Math.floor(c0 + ((x + 1) * (c1 - c0)) / w));
      let lo = 255, hi = 0;
      for (let c = Math.max(0, a); c < Math.min(this.columns, b, a + Math.ceil(step) + 1); c++) {
        lo = Math.min(lo, this.peaks[2 * c]); hi = Math.max(hi, this.peaks[2 * c + 1]);
      }
      if (hi < lo) continue;
      const top = mid - ((hi - 127.5) / 127.5) * mid * gain, bottom = mid - ((lo - 127.5) / 127.5) * mid * gain;
      ctx.fillRect(x, top, 1, Math.max(1, bottom - top));
    }
  }
}

// Ticks every 1, 2, 5, 10, 15, 30 s, 1, 2, 5, 10, 15, 30 min or 1, 2, ... h, about one per 90 px.
function tickStep(span, width) {
  const steps = [0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 28800];
  const want = span / Math.max(1, width / 90);
  return steps.find((s) => s >= want) || steps[steps.length - 1];
}

function drawAxis(canvas, t0, t1) {
  const { ctx, w, h } = fitCanvas(canvas), step = tickStep(t1 - t0, w);
  ctx.fillStyle = cssVar("--muted");
  ctx.strokeStyle = cssVar("--line");
  ctx.font = "11px system-ui, sans-serif";
  ctx.textBaseline = "middle";
  for (let t = Math.ceil(t0 / step) * step; t <= t1; t += step) {
    const x = ((t - t0) / (t1 - t0)) * w;
    ctx.fillRect(x, 0, 1, 5);
    ctx.fillText(clock(t, step < 1), x + 3, h / 2 + 2);
  }
}

// A table sorted by clicking a header and filtered by a search box (and `also`, a test of each
// row). `columns`: {label, num}; `rows`: {cells: [node or text], sort: [value], text}. A row may
// get a `detail` <tr> that stays under it. Returns its parts.
function sortableTable(columns, rows, { rowClass = "", placeholder = "filter", onRow, onFilter, also } = {}) {
  const table = el("table"), head = el("tr"), body = el("tbody");
  const filter = el("input", { type: "search", placeholder, class: "grow" });
  const shown = el("span", { class: "muted" });
  let order = null;
  columns.forEach((col, i) => head.append(el("th", { class: col.num ? "num" : "", text: col.label, title: "sort",
    onclick: () => sortBy(i) })));
  table.append(el("thead", {}, head), body);
  for (const row of rows) {
    row.tr = el("tr", { class: rowClass }, row.cells.map((cell, i) => el("td", { class: columns[i].num ? "num" : "" }, cell)));
    row.text = (row.text || row.cells.map((c) => (typeof c === "string" ? c : c.textContent)).join(" ")).toLowerCase();
    if (onRow) row.tr.addEventListener("click", (event) => onRow(row, event));
  }
  function place() {
    body.replaceChildren(...rows.flatMap((r) => (r.detail ? [r.tr, r.detail] : [r.tr])));
  }
  function sortBy(i) {
    const down = order && order.i === i && !order.down;
    order = { i, down };
    head.querySelectorAll("th").forEach((th, k) => th.className = (columns[k].num ? "num " : "") + (k === i ? (down ? "down" : "up") : ""));
    const key = (r) => r.sort[i];
    rows.sort((a, b) => {
      const x = key(a), y = key(b);
      const c = x === y ? 0 : x === null || x === undefined ? 1 : y === null || y === undefined ? -1
        : typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y), undefined, { numeric: true });
      return down ? -c : c;
    });
    place();
  }
  function apply() {
    const words = filter.value.toLowerCase().split(/\s+/).filter(Boolean);
    let count = 0;
    for (const row of rows) {
      const keep = words.every((w) => row.text.includes(w)) && (!also || also(row));
      row.tr.hidden = !keep;
      if (row.detail) row.detail.hidden = !keep || !row.open;
      count += keep;
    }
    shown.textContent = `${count} of ${rows.length}`;
    if (onFilter) onFilter(rows.filter((r) => !r.tr.hidden));
  }
  filter.addEventListener("input", apply);
  place();
  apply();
  return { table, filter, shown, rows, apply };
}

function download(name, text, type) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = el("a", { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}
