// The page of a run's rows (ask, caption, compare with -f html, and `mellow report`): rows are
// grouped into items (one question about one recording, its windows together); one item is shown
// as a timeline, several as a table whose rows open to their timelines.

const DATA = pageData();
const ROWS = pageRows();

function said(row) { return "prediction" in row ? row.prediction : row.answer; }
function base(path) { return String(path).split(/[\\/]/).pop(); }

function itemsOf(rows) {
  const items = new Map();
  for (const row of rows) {
    const key = JSON.stringify([row.id ?? null, row.audio, row.audio2, row.question]);
    if (!items.has(key)) items.set(key, { audio: row.audio, audio2: row.audio2, question: row.question, id: row.id, rows: [] });
    items.get(key).rows.push(row);
  }
  for (const item of items.values()) {
    // Every row has its span; a recording heard as one clip from its start is not a timeline.
    item.windowed = item.rows.length > 1 || item.rows.some((r) => r.start);
    item.choices = (item.rows.find((r) => r.choices) || {}).choices || null;
    item.failed = item.rows.filter((r) => r.error).length;
  }
  return [...items.values()];
}

// Answers ranked by how many windows gave them (choices in their own order), each with a colour.
function colours(item) {
  const counts = new Map();
  for (const row of item.rows) if (!row.error) counts.set(said(row), (counts.get(said(row)) || 0) + 1);
  const ranked = item.choices ? [...item.choices] : [...counts.keys()].sort((a, b) => counts.get(b) - counts.get(a));
  // Answers that never repeat (captions, say) share two alternating tones: colour would mean nothing.
  const unique = !item.choices && ranked.every((a) => counts.get(a) === 1);
  const colour = new Map(ranked.map((a, i) => [a, unique ? PALETTE[i % 2 ? 4 : 0] : i < PALETTE.length ? PALETTE[i] : cssVar("--other")]));
  return { counts, ranked, colour, unique };
}

function summary(item) {
  if (!item.windowed) return item.rows[0].error ? item.rows[0].error : said(item.rows[0]);
  const { counts, ranked, unique } = colours(item), shown = ranked.filter((a) => counts.get(a)).slice(0, 3);
  const more = counts.size - shown.length;
  if (unique && counts.size > 1) return `${counts.size} different answers: ${ranked[0]} …`;
  return shown.map((a) => `${a} ×${counts.get(a)}`).join(" · ") + (more > 0 ? ` · ${more} more` : "");
}

function probability(row, choice) {
  const found = (row.scores || {})[choice];
  return found === undefined ? null : found;
}

// --- a timeline ------------------------------------------------------------------------------

function timeline(item) {
  const rec = DATA.recordings[item.audio] || {};
  const picture = rec.picture ? new Picture(rec.picture) : null;
  const windows = item.windowed ? item.rows.filter((r) => r.start !== null && r.start !== undefined) : [];
  const duration = Math.max(picture ? picture.duration : 0, ...windows.map((r) => r.end || 0), 0) || 10;
  const { counts, ranked, colour, unique } = colours(item);
  let t0 = 0, t1 = duration, mode = picture && picture.hasSpectrogram ? "spectrogram" : "waveform", stopAt = null, current = null;

  const audio = rec.src ? el("audio", { controls: true, preload: rec.src.startsWith("data:") ? "auto" : "none", src: rec.src }) : null;
  const second = item.audio2 && item.audio2 !== item.audio ? (DATA.recordings[item.audio2] || {}) : null;
  const head = el("div", { class: "head" },
    el("div", {}, el("strong", { text: base(item.audio), title: item.audio }),
      second ? el("span", { class: "muted", text: ` with ${base(item.audio2)}` }) : null,
      item.id !== null && item.id !== undefined ? el("span", { class: "muted", text: ` · id ${item.id}` }) : null),
    el("div", { class: "muted", text: item.question }),
    !item.windowed ? el("div", { class: item.rows[0].error ? "answer error" : "answer", text: summary(item) }) : null,
    !item.windowed && item.rows[0].scores ? el("div", { class: "muted", text: Object.entries(item.rows[0].scores).map(([choice, p]) => `${choice} ${percent(p)}`).join(" · ") }) : null);

  const canvasPicture = picture ? el("canvas", { class: "picture" }) : null;
  const note = picture ? null : el("div", { class: "note", text: DATA.index ? "" : `no picture of the audio: ${rec.problem || "not drawn"}` });
  const canvasLines = item.choices && windows.length ? el("canvas", { class: "lines" }) : null;
  const lanes = laneCount(windows);
  const track = windows.length ? el("div", { class: "track", style: { height: `${lanes.count * 24 + 4}px` } }) : null;
  const axis = el("canvas", { class: "axis" });
  const playhead = el("div", { class: "playhead" });
  const stack = el("div", { class: "stack" }, note && note.textContent ? note : null, canvasPicture, canvasLines, track, axis, playhead);

  const buttons = windows.map((row, i) => {
    const text = row.error ? row.error : said(row), p = item.choices && !row.error ? probability(row, said(row)) : null;
    const b = el("button", { class: row.error ? "win failed" : "win", text, "data-start": row.start, "data-end": row.end,
      title: `${clock(row.start, true)}–${clock(row.end, true)}  ${text}${p !== null ? ` (${percent(p)})` : ""}`,
      style: { background: row.error ? null : colour.get(said(row)), top: `${lanes.of[i] * 24 + 2}px` },
      onclick: (event) => { event.stopPropagation(); play(i); } });
    if (track) track.append(b);
    return b;
  });

  const modeButtons = picture && picture.hasSpectrogram ? ["spectrogram", "waveform"].map((m) =>
    el("button", { text: m, class: m === mode ? "on" : "", onclick: () => { mode = m; modeButtons.forEach((b) => b.classList.toggle("on", b.textContent === m)); draw(); } })) : [];
  const span = el("span", { class: "muted" });
  const controls = el("div", { class: "bar" }, modeButtons,
    el("button", { text: "−", title: "zoom out", onclick: () => zoom(2, (t0 + t1) / 2) }),
    el("button", { text: "+", title: "zoom in", onclick: () => zoom(0.5, (t0 + t1) / 2) }),
    el("button", { text: "all", title: "the whole recording", onclick: () => setView(0, duration) }),
    span);

  const legend = el("div", { class: "legend" }, ranked.filter((a) => counts.get(a) || item.choices).slice(0, PALETTE.length).map((a) =>
    el("span", {}, el("span", { class: "swatch", style: { background: colour.get(a) } }), `${a} `, el("span", { class: "muted", text: `×${counts.get(a) || 0}` }))));

  const list = windows.length ? windowTable(item, windows, play, (shown) => {
    const keep = new Set(shown.map((r) => r.index));
    buttons.forEach((b, i) => b.classList.toggle("dim", !keep.has(i)));
  }) : null;

  function play(i) {
    const row = windows[i];
    if (current !== null) { buttons[current].classList.remove("playing"); list && list.rows[current].classList.remove("playing"); }
    current = i;
    buttons[i].classList.add("playing");
    if (list) list.rows[i].classList.add("playing");
    if (row.start < t0 || row.end > t1) {
      const width = Math.max(t1 - t0, row.end - row.start);
      setView(row.start - (width - (row.end - row.start)) / 2, row.start + (width + (row.end - row.start)) / 2);
    }
    if (audio) {
      audio.currentTime = row.start;
      stopAt = row.end;
      audio.play().catch(() => {});
    }
  }

  function setView(a, b) {
    const width = Math.min(duration, Math.max(b - a, Math.min(1, duration)));
    t0 = Math.max(0, Math.min(a, duration - width));
    t1 = t0 + width;
    draw();
  }

  function zoom(factor, at) { setView(at - (at - t0) * factor, at + (t1 - at) * factor); }

  let pending = false;
  function draw() {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      const width = stack.clientWidth;
      if (canvasPicture) {
        const { ctx, w, h } = fitCanvas(canvasPicture);
        picture.draw(ctx, w, h, t0, t1, mode);
      }
      if (canvasLines) drawLines(canvasLines, item, windows, colour, t0, t1);
      drawAxis(axis, t0, t1);
      windows.forEach((row, i) => {
        const b = buttons[i], x0 = ((row.start - t0) / (t1 - t0)) * width, x1 = ((row.end - t0) / (t1 - t0)) * width;
        b.hidden = x1 < 0 || x0 > width;
        b.style.left = `${x0}px`;
        b.style.width = `${Math.max(2, x1 - x0 - 1)}px`;
      });
      span.textContent = `${clock(t0, true)} – ${clock(t1, true)} of ${clock(duration, true)}` + (windows.length ? ` · ${windows.length} windows` : "");
      movePlayhead();
    });
  }

  function movePlayhead() {
    if (!audio || audio.paused && !audio.currentTime) { playhead.style.display = "none"; return; }
    const x = ((audio.currentTime - t0) / (t1 - t0)) * stack.clientWidth;
    playhead.style.display = x >= 0 && x <= stack.clientWidth ? "block" : "none";
    playhead.style.left = `${x}px`;
  }

  if (audio) {
    audio.addEventListener("timeupdate", () => {
      if (stopAt !== null && audio.currentTime >= stopAt) { audio.pause(); stopAt = null; }
      movePlayhead();
    });
    audio.addEventListener("seeking", movePlayhead);
    audio.addEventListener("play", function tick() { movePlayhead(); if (!audio.paused) requestAnimationFrame(tick); });
  }

  // Wheel zooms around the pointer, a drag pans, a click seeks there.
  stack.addEventListener("wheel", (event) => {
    event.preventDefault();
    const at = t0 + (event.offsetX / stack.clientWidth) * (t1 - t0);
    zoom(event.deltaY > 0 ? 1.25 : 0.8, at);
  }, { passive: false });
  if (canvasPicture) {
    let drag = null;
    canvasPicture.addEventListener("pointerdown", (event) => { drag = { x: event.clientX, t0, t1, moved: false }; canvasPicture.setPointerCapture(event.pointerId); });
    canvasPicture.addEventListener("pointermove", (event) => {
      if (!drag) return;
      const dt = ((event.clientX - drag.x) / stack.clientWidth) * (drag.t1 - drag.t0);
      if (Math.abs(event.clientX - drag.x) > 3) drag.moved = true;
      if (drag.moved) setView(drag.t0 - dt, drag.t1 - dt);
    });
    canvasPicture.addEventListener("pointerup", (event) => {
      if (drag && !drag.moved && audio) {
        stopAt = null;
        audio.currentTime = t0 + (event.offsetX / stack.clientWidth) * (t1 - t0);
        movePlayhead();
      }
      drag = null;
    });
  }
  new ResizeObserver(draw).observe(stack);

  const section = el("section", { class: "timeline" }, head, controls, stack, item.windowed && ranked.length && !unique ? legend : null, audio,
    second && second.src ? el("div", { class: "muted" }, `the second recording, ${base(item.audio2)}${item.windowed ? ", heard whole beside each window" : ""}`,
      el("audio", { controls: true, preload: "none", src: second.src })) : null,
    list ? list.node : null);
  draw();
  return section;
}

// Windows that overlap (a hop shorter than the window) go on lanes of their own.
function laneCount(windows) {
  const ends = [], of = windows.map((row) => {
    let lane = ends.findIndex((end) => end <= row.start + 1e-6);
    if (lane < 0) { lane = ends.length < 6 ? ends.length : ends.indexOf(Math.min(...ends)); }
    ends[lane] = row.end;
    return lane;
  });
  return { of, count: Math.max(1, ends.length) };
}

// Each choice's probability in each window, as a line through the windows' middles.
function drawLines(canvas, item, windows, colour, t0, t1) {
  const { ctx, w, h } = fitCanvas(canvas), pad = 6, y = (p) => h - pad - p * (h - 2 * pad);
  ctx.strokeStyle = cssVar("--line");
  ctx.setLineDash([3, 4]);
  for (const p of [0, 0.5, 1]) { ctx.beginPath(); ctx.moveTo(0, y(p)); ctx.lineTo(w, y(p)); ctx.stroke(); }
  ctx.setLineDash([]);
  ctx.fillStyle = cssVar("--muted");
  ctx.font = "10px system-ui, sans-serif";
  ctx.fillText("1", 3, y(1) + 10);
  ctx.fillText("0.5", 3, y(0.5) - 2);
  ctx.lineWidth = 1.5;
  for (const choice of item.choices) {
    ctx.strokeStyle = colour.get(choice);
    ctx.beginPath();
    let drawing = false;
    for (const row of windows) {
      const p = row.error ? null : probability(row, choice);
      if (p === null) { drawing = false; continue; }
      const x = (((row.start + row.end) / 2 - t0) / (t1 - t0)) * w;
      if (drawing) ctx.lineTo(x, y(p)); else ctx.moveTo(x, y(p));
      drawing = true;
    }
    ctx.stroke();
  }
}

function windowTable(item, windows, play, onFilter) {
  const columns = [{ label: "#", num: true }, { label: "start", num: true }, { label: "end", num: true }, { label: "answer" }];
  if (item.choices) columns.push({ label: "probability", num: true });
  const rows = windows.map((row, i) => {
    const p = item.choices && !row.error ? probability(row, said(row)) : null;
    const cells = [String(i + 1), clock(row.start, true), clock(row.end, true),
      row.error ? el("span", { class: "error", text: row.error }) : said(row)];
    if (item.choices) cells.push(percent(p));
    return { index: i, cells, sort: [i, row.start, row.end, row.error || said(row), p] };
  });
  const table = sortableTable(columns, rows, { rowClass: "wrow", placeholder: "filter the windows", onRow: (r) => play(r.index), onFilter });
  const byIndex = rows.map((r) => r.tr); // before any sort: the i-th window's row
  byIndex.forEach((tr, i) => { tr.dataset.start = windows[i].start; });
  return { node: el("div", {}, el("div", { class: "bar" }, table.filter, table.shown), el("div", { class: "scroll" }, table.table)),
    rows: byIndex };
}

// --- several items: a table ------------------------------------------------------------------

function itemTable(items) {
  const has = (f) => items.some(f);
  const columns = [{ label: "#", num: true, get: (it, i) => [String(i + 1), i] }];
  if (has((it) => it.id !== null && it.id !== undefined)) columns.push({ label: "id", get: (it) => [String(it.id ?? ""), it.id] });
  columns.push({ label: "recording", get: (it) => {
    const rec = DATA.recordings[it.audio] || {};
    const node = rec.page ? el("a", { href: rec.page, text: base(it.audio), title: it.audio, onclick: (e) => e.stopPropagation() }) : el("span", { text: base(it.audio), title: it.audio });
    return [node, base(it.audio)];
  } });
  if (has((it) => it.audio2 && it.audio2 !== it.audio)) columns.push({ label: "second", get: (it) => [it.audio2 !== it.audio ? base(it.audio2) : "", it.audio2] });
  if (new Set(items.map((it) => it.question)).size > 1) columns.push({ label: "question", get: (it) => [it.question, it.question] });
  if (has((it) => it.windowed)) columns.push({ label: "windows", num: true, get: (it) => [String(it.rows.length), it.rows.length] });
  columns.push({ label: "answer", get: (it) => {
    const text = summary(it), bad = !it.windowed && it.rows[0].error;
    return [el("span", { class: bad ? "error" : "", text }), text];
  } });
  if (has((it) => "prediction" in it.rows[0])) columns.push({ label: "gold", get: (it) => [String(it.rows[0].answer ?? ""), it.rows[0].answer] });
  if (has((it) => it.failed && it.windowed)) columns.push({ label: "failed", num: true, get: (it) => [String(it.failed), it.failed] });

  const rows = items.map((item, i) => {
    const got = columns.map((c) => c.get(item, i));
    return { item, cells: got.map((g) => g[0]), sort: got.map((g) => g[1]),
      text: [item.audio, item.audio2, item.question, item.id, ...item.rows.map((r) => r.error || said(r))].join(" ") };
  });
  const table = sortableTable(columns, rows, { rowClass: "item", placeholder: "filter the recordings and answers", onRow: toggle });
  function toggle(row) {
    row.open = !row.open;
    row.tr.classList.toggle("open", row.open);
    if (!row.detail) {
      row.detail = el("tr", { class: "detail" }, el("td", { colspan: String(columns.length) }, timeline(row.item)));
      row.tr.after(row.detail);
    }
    row.detail.hidden = !row.open;
  }
  return el("div", {}, el("div", { class: "bar" }, table.filter, table.shown), table.table);
}

// --- the page --------------------------------------------------------------------------------

(function main() {
  const app = document.getElementById("app"), items = itemsOf(ROWS);
  const models = [...new Set(ROWS.map((r) => r.model).filter(Boolean))];
  const failed = ROWS.filter((r) => r.error).length;
  const jsonl = document.getElementById("rows").textContent.trim() + "\n";
  app.append(el("h1", { text: DATA.title }),
    el("p", { class: "sub" }, `${ROWS.length} row${ROWS.length === 1 ? "" : "s"}`,
      items.length > 1 ? ` · ${items.length} items` : "",
      models.length ? ` · model ${models.join(", ")}` : "",
      failed ? el("span", { class: "error", text: ` · ${failed} failed` }) : "", " · ",
      el("a", { href: "#", text: "rows as JSON lines", onclick: (e) => { e.preventDefault(); download("rows.jsonl", jsonl, "application/x-ndjson"); } })));
  if (items.length === 1 && !DATA.index) app.append(timeline(items[0]));
  else app.append(itemTable(items));
  document.body.dataset.ready = "1";
})();
