// `mellow serve`'s page: one or two clips (picked, dropped or recorded), a question, optional
// choices; the answer streamed from POST /v1/chat/completions as server-sent events; each clip's
// waveform; and the curl and openai calls that ask the same. Everything it sends is what a client
// following docs/serve.md would send.

const SERVE = pageData();
const FORMATS = { wav: "wav", wave: "wav", flac: "flac", mp3: "mp3", ogg: "ogg", oga: "ogg", opus: "ogg" };
const slots = [newSlot(0), newSlot(1)];
let key = sessionStorage.getItem("mellow-api-key");
let running = null;

// --- clips -----------------------------------------------------------------------------------

function newSlot(i) {
  const slot = { clip: null };
  const input = el("input", { type: "file", accept: "audio/*", id: `file${i + 1}`, hidden: true, onchange: () => input.files[0] && take(slot, input.files[0]) });
  const name = el("div", { class: "muted", text: i ? "second clip (optional): compared with the first" : "a clip: pick, drop or record" });
  const canvas = el("canvas", { hidden: true });
  const player = el("audio", { controls: true, hidden: true });
  const record = el("button", { text: "● record", hidden: !(navigator.mediaDevices && window.MediaRecorder), onclick: () => recordInto(slot, record) });
  const clear = el("button", { text: "remove", hidden: true, onclick: () => { slot.clip = null; show(slot); changed(); } });
  const drop = el("div", { class: "drop" }, name, el("div", { class: "bar", style: { justifyContent: "center" } },
    el("button", { text: "pick a file", onclick: () => input.click() }), record, clear));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files[0]) take(slot, e.dataTransfer.files[0]);
  });
  Object.assign(slot, { node: el("div", { class: "slot" }, drop, input, canvas, player), name, canvas, player, clear, index: i });
  return slot;
}

// A file becomes a clip: its bytes, the format the server is told, and its samples when this
// browser can decode them (for the waveform, and to send WAV where the server reads no other).
async function take(slot, file) {
  const bytes = new Uint8Array(await file.arrayBuffer());
  const ext = (file.name.split(".").pop() || "").toLowerCase();
  let samples = null, rate = 0;
  try {
    const decoded = await new OfflineAudioContext(1, 1, 44100).decodeAudioData(bytes.slice().buffer);
    samples = mix(decoded);
    rate = decoded.sampleRate;
  } catch (e) { /* the server may still read it */ }
  let clip = { name: file.name, bytes, format: FORMATS[ext], samples, rate, url: URL.createObjectURL(file) };
  if (!clip.format) {
    if (!samples) { say(`${file.name}: neither this browser nor the server reads .${ext} files; convert it to WAV, FLAC, MP3 or OGG`, true); return; }
    clip = { ...clip, name: file.name.replace(/\.[^.]*$/, "") + ".wav", bytes: wav(samples, rate), format: "wav" };
  }
  slot.clip = clip;
  show(slot);
  changed();
}

function mix(buffer) {
  const out = new Float32Array(buffer.length);
  for (let c = 0; c < buffer.numberOfChannels; c++) {
    const data = buffer.getChannelData(c);
    for (let i = 0; i < out.length; i++) out[i] += data[i] / buffer.numberOfChannels;
  }
  return out;
}

// 16-bit mono WAV: what every decoder reads.
function wav(samples, rate) {
  const out = new DataView(new ArrayBuffer(44 + samples.length * 2));
  const text = (at, s) => [...s].forEach((ch, i) => out.setUint8(at + i, ch.charCodeAt(0)));
  text(0, "RIFF"); out.setUint32(4, 36 + samples.length * 2, true); text(8, "WAVEfmt ");
  out.setUint32(16, 16, true); out.setUint16(20, 1, true); out.setUint16(22, 1, true); out.setUint32(24, rate, true);
  out.setUint32(28, rate * 2, true); out.setUint16(32, 2, true); out.setUint16(34, 16, true); text(36, "data");
  out.setUint32(40, samples.length * 2, true);
  samples.forEach((v, i) => out.setInt16(44 + i * 2, Math.max(-1, Math.min(1, v)) * 32767, true));
  return new Uint8Array(out.buffer);
}

function show(slot) {
  const clip = slot.clip;
  slot.canvas.hidden = !clip || !clip.samples;
  slot.player.hidden = !clip;
  slot.clear.hidden = !clip;
  if (!clip) { slot.name.textContent = slot.index ? "second clip (optional): compared with the first" : "a clip: pick, drop or record"; return; }
  slot.name.textContent = `${clip.name}${clip.samples ? ` · ${clock(clip.samples.length / clip.rate, true)}` : ""}`;
  slot.player.src = clip.url;
  if (clip.samples) {
    requestAnimationFrame(() => {
      const { ctx, w, h } = fitCanvas(slot.canvas);
      const picture = Picture.fromSamples(clip.samples, clip.rate, Math.max(1, Math.round(w)));
      picture.draw(ctx, w, h, 0, picture.duration, "waveform");
    });
  }
}

async function recordInto(slot, button) {
  if (slot.recorder) { slot.recorder.stop(); return; }
  let stream;
  try { stream = await navigator.mediaDevices.getUserMedia({ audio: true }); } catch (e) { say(`no microphone: ${e.message}`, true); return; }
  const parts = [], recorder = new MediaRecorder(stream);
  slot.recorder = recorder;
  button.textContent = "■ stop";
  recorder.ondataavailable = (e) => parts.push(e.data);
  recorder.onstop = async () => {
    stream.getTracks().forEach((t) => t.stop());
    slot.recorder = null;
    button.textContent = "● record";
    const decoded = await new OfflineAudioContext(1, 1, 44100).decodeAudioData(await new Blob(parts).arrayBuffer());
    const bytes = wav(mix(decoded), decoded.sampleRate);
    take(slot, new File([bytes], `recording-${slot.index + 1}.wav`, { type: "audio/wav" }));
  };
  recorder.start();
  setTimeout(() => recorder.state === "recording" && recorder.stop(), 30000);
}

// --- the request -----------------------------------------------------------------------------

const question = el("textarea", { id: "question", rows: 2, placeholder: "what do you hear?", oninput: () => changed() });
const choices = el("input", { type: "text", id: "choices", placeholder: "e.g. dog | cat | car", style: { width: "100%" }, oninput: () => changed() });
const defaultTokens = Math.min(100, SERVE.max_tokens);  // the server refuses more than its --max-tokens
const maxTokens = el("input", { type: "text", id: "max-tokens", value: String(defaultTokens), style: { width: "6em" }, oninput: () => changed() });
const ask = el("button", { class: "primary", id: "ask", text: "ask", onclick: () => send() });
const state = el("span", { id: "state", class: "muted" });
const answer = el("div", { id: "answer", class: "out" });
const probabilities = el("div", { id: "probabilities" });
const keyInput = el("input", { type: "password", id: "api-key", placeholder: "the server's --api-key" });
const keyForm = el("div", { class: "panel", id: "key-form", hidden: true },
  el("div", { text: "This server asks for an API key. It is kept in this tab only." }),
  el("div", { class: "bar" }, keyInput, el("button", { text: "use the key", id: "use-key", onclick: () => useKey() })));
const curl = el("pre", { id: "curl" }), python = el("pre", { id: "python" });

function choiceList() { return choices.value.split("|").map((c) => c.trim()).filter(Boolean); }
function clips() { return slots.map((s) => s.clip).filter(Boolean); }
function tokens() { const n = parseInt(maxTokens.value, 10); return Number.isFinite(n) && n > 0 ? n : defaultTokens; }

function body(data) {
  const content = clips().map((clip, i) => ({ type: "input_audio", input_audio: { data: data ? data[i] : "…", format: clip.format } }));
  content.push({ type: "text", text: question.value.trim() });
  const out = { model: "mellow", stream: true, max_tokens: tokens(), messages: [{ role: "user", content }] };
  if (choiceList().length) out.mellow = { choices: choiceList() };
  return out;
}

function base64(bytes) {
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

function say(text, bad) {
  state.textContent = text;
  state.className = bad ? "error" : "muted";
}

async function send() {
  if (!clips().length) return say("pick, drop or record a clip first", true);
  if (!question.value.trim()) return say("type a question", true);
  if (choiceList().length === 1) return say("give at least two choices, separated by |", true);
  if (running) running.abort();
  running = new AbortController();
  answer.textContent = "";
  probabilities.replaceChildren();
  ask.disabled = true;
  say("sending…");
  const started = performance.now();
  try {
    const response = await fetch("/v1/chat/completions", { method: "POST", signal: running.signal,
      headers: { "Content-Type": "application/json", ...(key ? { Authorization: `Bearer ${key}` } : {}) },
      body: JSON.stringify(body(clips().map((c) => base64(c.bytes)))) });
    if (response.status === 401) {
      key = null;
      sessionStorage.removeItem("mellow-api-key");
      keyForm.hidden = false;
      keyInput.focus();
      return say("the server asks for its API key", true);
    }
    if (!response.ok) {
      const problem = await response.json().catch(() => ({}));
      return say(`${response.status}: ${(problem.error && problem.error.message) || response.statusText}`, true);
    }
    await read(response, started);
  } catch (e) {
    if (e.name !== "AbortError") say(`the request failed: ${e.message}`, true);
  } finally {
    ask.disabled = false;
  }
}

// Server-sent events: `data: {chunk}` lines until `data: [DONE]`.
async function read(response, started) {
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "", first = null, finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") {
        const seconds = (performance.now() - started) / 1000;
        say(`done in ${seconds.toFixed(1)} s${first !== null ? `, first words after ${first.toFixed(1)} s` : ""}${finish === "length" ? " (cut at max tokens)" : ""}`);
        document.body.dataset.answered = String(Number(document.body.dataset.answered || 0) + 1);
        return;
      }
      const chunk = JSON.parse(data);
      if (chunk.error) return say(chunk.error.message, true);
      const choice = chunk.choices && chunk.choices[0];
      if (choice && choice.delta && choice.delta.content) {
        if (first === null) { first = (performance.now() - started) / 1000; say("answering…"); }
        answer.textContent += choice.delta.content;
      }
      if (choice && choice.finish_reason) finish = choice.finish_reason;
      if (chunk.mellow) showChoices(chunk.mellow.choices);
    }
  }
  say("the stream ended early", true);
}

function showChoices(scored) {
  probabilities.replaceChildren(...scored.map((s, i) => el("div", { class: "bar" },
    el("span", { style: { width: "10em" }, text: s.choice }),
    el("span", { class: "grow" }, el("span", { class: "swatch", style: { width: `${Math.max(1, 100 * s.probability)}%`, background: PALETTE[i % PALETTE.length] } })),
    el("span", { class: "num", style: { width: "4em", textAlign: "right" }, text: percent(s.probability) }))));
}

function useKey() {
  key = keyInput.value.trim();
  if (!key) return;
  sessionStorage.setItem("mellow-api-key", key);
  keyForm.hidden = true;
  changed();
  send();
}

// --- the same request from a terminal or a script --------------------------------------------

function changed() {
  const origin = location.origin, list = choiceList(), given = clips().length ? clips() : [{ name: "clip.wav", format: "wav" }];
  const shell = (s) => `'${s.replace(/'/g, "'\\''")}'`;
  const heredoc = (s) => s.replace(/\\/g, "\\\\").replace(/\$/g, "\\$").replace(/`/g, "\\`");
  const parts = given.map((c) => `  {"type": "input_audio", "input_audio": {"data": "$(base64 -w0 ${shell(c.name)})", "format": "${c.format}"}},`);
  const extra = list.length ? `, "mellow": {"choices": ${heredoc(JSON.stringify(list))}}` : "";
  curl.textContent = [
    `curl -N ${origin}/v1/chat/completions -H 'Content-Type: application/json'${key ? ` -H "Authorization: Bearer $MELLOW_API_KEY"` : ""} -d @- <<EOF`,
    `{"model": "mellow", "stream": true, "max_tokens": ${tokens()}${extra}, "messages": [{"role": "user", "content": [`,
    ...parts,
    `  {"type": "text", "text": ${heredoc(JSON.stringify(question.value.trim() || "what do you hear?"))}}]}]}`,
    "EOF"].join("\n");
  python.textContent = [
    "import base64" + (key ? "\nimport os" : ""),
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url="${origin}/v1", api_key=${key ? 'os.environ["MELLOW_API_KEY"]' : '"unused"'})`,
    "",
    "def clip(path, fmt):",
    "    data = base64.b64encode(open(path, \"rb\").read()).decode()",
    "    return {\"type\": \"input_audio\", \"input_audio\": {\"data\": data, \"format\": fmt}}",
    "",
    "stream = client.chat.completions.create(",
    `    model="mellow", stream=True, max_tokens=${tokens()},`,
    `    messages=[{"role": "user", "content": [${given.map((c) => `clip(${JSON.stringify(c.name)}, "${c.format}")`).join(", ")},`,
    `                                           {"type": "text", "text": ${JSON.stringify(question.value.trim() || "what do you hear?")}}]}],`,
    ...(list.length ? [`    extra_body={"mellow": {"choices": ${JSON.stringify(list)}}},`] : []),
    ")",
    "for chunk in stream:",
    "    if chunk.choices:",
    "        print(chunk.choices[0].delta.content or \"\", end=\"\", flush=True)",
  ].join("\n");
}

(function main() {
  const app = document.getElementById("app");
  app.append(el("h1", { text: `mellow · ${SERVE.model}` }),
    el("p", { class: "sub", text: "Ask about one clip, or compare two. The answer comes from this server's POST /v1/chat/completions, streamed." }),
    el("div", { class: "slots" }, slots.map((s) => s.node)),
    el("label", { text: "question", for: "question" }), question,
    el("label", { for: "choices" }, "choices ", el("span", { class: "muted", text: "(optional, separated by |: the model names the likeliest)" })), choices,
    el("div", { class: "bar" }, el("span", { text: "max tokens" }), maxTokens, el("span", { class: "grow" }), state, ask),
    keyForm,
    el("div", { class: "panel" }, answer, probabilities),
    el("h2", { text: "the same with curl" }), curl,
    el("h2", { text: "the same with the openai client" }), python);
  question.addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) send(); });
  changed();
  document.body.dataset.ready = "1";
})();
