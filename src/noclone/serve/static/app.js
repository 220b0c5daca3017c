// noclone's web page: pick photos, cloak them through the API, compare before / after / after JPEG 75, download.
// Plain JavaScript, no dependencies: everything the page needs is served by the noclone server itself.
"use strict";

const $ = (id) => document.getElementById(id);
const ACCEPTED = ["image/png", "image/jpeg", "image/webp"];
const PARALLEL = 4;            // RID photos sent at once: the server batches concurrent photos into one pass
const KEPT_MAX_PIXELS = 4e6;   // the "kept after JPEG" figure is computed in the page; skip it on huge photos

const state = { files: [], results: [], refused: 0, info: null, token: sessionStorage.getItem("noclone-token") || "",
                job: null, running: false, cancelled: false, urls: [] };

function authHeaders() { return state.token ? { Authorization: "Bearer " + state.token } : {}; }

function setStatus(text, isError) {
  const el = $("status");
  el.textContent = text;
  el.className = isError ? "error" : "";
}

function setProgress(fraction) {
  const bar = $("progress");
  bar.hidden = false;
  bar.value = Math.round(Math.max(0, Math.min(1, fraction)) * 100);
}

async function api(path, options = {}) {
  const resp = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (!resp.ok) {
    let message = `${resp.status} ${resp.statusText}`;
    try { const body = await resp.json(); if (body && body.error) message = body.error; } catch (e) { /* not JSON */ }
    const err = new Error(message);
    err.status = resp.status;
    err.retryAfter = Number(resp.headers.get("Retry-After") || 0);
    throw err;
  }
  return resp;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ------------------------------------------------------------------------------------------- server info

async function loadInfo() {
  try {
    state.info = await (await api("/v1/methods")).json();
  } catch (e) {
    if (e.status === 401) {
      $("token-box").open = true;
      setStatus("This server needs an access token (ask whoever runs it).", true);
    } else {
      setStatus("Cannot reach the server: " + e.message, true);
    }
    return;
  }
  setStatus("");
  const methods = $("method");
  methods.innerHTML = "";
  for (const [name, m] of Object.entries(state.info.methods)) {
    const opt = document.createElement("option");
    opt.value = name;
    opt.textContent = name === "rid" ? "RID (instant)" : `${name.toUpperCase()} (slower, runs as a job)`;
    methods.appendChild(opt);
  }
  const strength = $("strength");
  strength.innerHTML = "";
  for (const [name, s] of Object.entries(state.info.strengths)) {
    const opt = document.createElement("option");
    opt.value = name;
    opt.textContent = `${name} (${s.budget_255}/255)`;
    if (name === "standard") opt.selected = true;
    strength.appendChild(opt);
  }
  const l = state.info.limits;
  const pixels = l.max_pixels >= 1e6 ? `${Math.round(l.max_pixels / 1e6)} megapixels`
                                      : `${l.max_pixels.toLocaleString("en")} pixels`;
  $("limits-note").textContent = `PNG, JPEG or WebP; up to ${l.max_files} photos, ${l.max_file_mb} MB and ` +
    `${pixels} each.`;
  showMethodNote();
  updateButtons();
}

function showMethodNote() {
  const m = state.info && state.info.methods[$("method").value];
  const box = $("model-warning");
  if (!m) { box.hidden = true; return; }
  $("method-note").textContent = m.kind + (m.model ? ` against model ${m.model}` : "");
  if (m.warning) {
    box.innerHTML = "";
    const title = document.createElement("strong");
    title.textContent = "This cloak is not made for real photos on this server.";
    box.appendChild(title);
    box.appendChild(document.createTextNode(m.warning));
    box.hidden = false;
  } else {
    box.hidden = true;
  }
}

// ------------------------------------------------------------------------------------------- picking photos

function addFiles(list) {
  const skipped = [];
  for (const file of list) {
    if (ACCEPTED.includes(file.type)) state.files.push(file);
    else skipped.push(file.name);
  }
  $("picked").textContent = state.files.length ? `${state.files.length} photo(s): ` +
    state.files.map((f) => f.name).join(", ") : "";
  if (skipped.length) setStatus(`Skipped (not PNG, JPEG or WebP): ${skipped.join(", ")}`, true);
  updateButtons();
}

function updateButtons() {
  $("cloak").disabled = state.running || !state.files.length || !state.info;
  $("cancel").hidden = !state.running;
  $("download-all").hidden = state.running || !state.results.length;
  $("clear").disabled = state.running || (!state.files.length && !$("results").children.length);
}

function clearAll() {
  for (const url of state.urls) URL.revokeObjectURL(url);
  Object.assign(state, { files: [], results: [], refused: 0, urls: [] });
  $("results").innerHTML = "";
  $("picked").textContent = "";
  $("progress").hidden = true;
  setStatus("");
  updateButtons();
}

// ------------------------------------------------------------------------------------------- cloaking

async function cloakAll() {
  const method = $("method").value;
  const budget = $("strength").value;
  const files = state.files.slice();
  for (const url of state.urls) URL.revokeObjectURL(url);
  state.urls = [];
  state.results = [];
  state.refused = 0;
  state.cancelled = false;
  $("results").innerHTML = "";
  state.running = true;
  updateButtons();
  setProgress(0);
  try {
    if (method === "rid") await cloakRid(files, budget);
    else await cloakJob(files, method, budget);
    if (!state.cancelled) {
      setStatus(`Done: ${state.results.length} photo(s) cloaked` +
                (state.refused ? `, ${state.refused} refused (see below).` : "."), state.refused > 0);
    }
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    state.running = false;
    state.job = null;
    updateButtons();
  }
}

async function postWithRetry(form) {
  for (let attempt = 0; ; attempt++) {
    try {
      return await api("/v1/cloak", { method: "POST", body: form });
    } catch (e) {
      if (e.status !== 429 || attempt >= 5 || state.cancelled) throw e;
      setStatus(`Server busy, retrying in ${e.retryAfter || 1} s...`);
      await sleep(1000 * (e.retryAfter || 1));
    }
  }
}

async function cloakRid(files, budget) {
  let done = 0, next = 0;
  setStatus(`Cloaking ${files.length} photo(s)...`);
  async function worker() {
    while (next < files.length && !state.cancelled) {
      const index = next++;
      const file = files[index];
      const form = new FormData();
      form.append("files", file, file.name);
      form.append("method", "rid");
      form.append("budget", budget);
      try {
        const resp = await postWithRetry(form);
        const blob = await resp.blob();
        await addResult(index, file, cloakedName(resp, file.name), blob, resp.headers.get("X-Noclone-Warning"));
      } catch (e) {
        if (e.status === 401) throw e;
        addRefused(index, file, e.message);  // one refused photo does not stop the others
      }
      done += 1;
      setProgress(done / files.length);
    }
  }
  await Promise.all(Array.from({ length: Math.min(PARALLEL, files.length) }, worker));
}

async function cloakJob(files, method, budget) {
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  form.append("method", method);
  form.append("budget", budget);
  const job = await (await postWithRetry(form)).json();
  state.job = job.id;
  setStatus(`Queued (${method}, job ${job.id})...`);
  let info = job;
  while (info.state === "queued" || info.state === "running") {
    await sleep(500);
    if (state.cancelled) return;
    info = await (await api(`/v1/jobs/${job.id}`)).json();
    setProgress(info.progress);
    setStatus(`${info.state === "queued" ? "Waiting for the worker" : "Cloaking"} (${method}): ` +
              `${Math.round(info.progress * 100)} %`);
  }
  if (info.state !== "done") throw new Error(`The job ${info.state}: ${info.error || ""}`);
  for (let i = 0; i < info.files.length; i++) {
    const name = info.files[i];
    const resp = await api(`/v1/jobs/${job.id}/result?file=${encodeURIComponent(name)}`);
    await addResult(i, files[i], name, await resp.blob(), info.warning || resp.headers.get("X-Noclone-Warning"));
  }
  setProgress(1);
}

function cloakedName(resp, fallback) {
  const m = /filename="([^"]+)"/.exec(resp.headers.get("Content-Disposition") || "");
  return m ? m[1] : fallback.replace(/\.[^.]+$/, "") + ".png";
}

async function cancel() {
  state.cancelled = true;
  if (state.job) {
    try { await api(`/v1/jobs/${state.job}`, { method: "DELETE" }); } catch (e) { /* already gone */ }
  }
  setStatus("Cancelled.");
}

// ------------------------------------------------------------------------------------------- results

function objectUrl(blob) {
  const url = URL.createObjectURL(blob);
  state.urls.push(url);
  return url;
}

async function toJpeg75(blob) {
  const bitmap = await createImageBitmap(blob);
  const canvas = document.createElement("canvas");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  canvas.getContext("2d").drawImage(bitmap, 0, 0);
  return await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.75));
}

async function pixelsOf(blob) {
  const bitmap = await createImageBitmap(blob);
  const canvas = document.createElement("canvas");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  return ctx.getImageData(0, 0, bitmap.width, bitmap.height);
}

// How much of the cloak JPEG 75 leaves: the change the cloak still makes after both photos are recompressed,
// projected on the cloak itself (1 = all of it survives, 0 = none).
async function keptAfterJpeg(original, cloaked, cloakedJpeg) {
  const [o, c, jc, jo] = await Promise.all([pixelsOf(original), pixelsOf(cloaked), pixelsOf(cloakedJpeg),
                                            toJpeg75(original).then(pixelsOf)]);
  if (o.width !== c.width || o.height !== c.height || o.width * o.height > KEPT_MAX_PIXELS) return null;
  let num = 0, den = 0;
  for (let i = 0; i < o.data.length; i++) {
    if (i % 4 === 3) continue;
    const d = c.data[i] - o.data[i];
    num += (jc.data[i] - jo.data[i]) * d;
    den += d * d;
  }
  return den > 0 ? num / den : null;
}

function figure(caption, url, cls) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.src = url;
  img.alt = caption;
  img.className = cls;
  const cap = document.createElement("figcaption");
  cap.textContent = caption;
  fig.append(img, cap);
  return fig;
}

function addRefused(index, original, message) {
  state.refused += 1;
  const card = document.createElement("article");
  card.className = "card refused";
  card.style.order = index;
  const title = document.createElement("h3");
  title.textContent = original.name;
  const text = document.createElement("p");
  text.className = "error";
  text.textContent = "Not cloaked: " + message;
  card.append(title, text);
  $("results").appendChild(card);
}

async function addResult(index, original, name, blob, warning) {
  state.results.push({ index, name, blob });
  const card = document.createElement("article");
  card.className = "card";
  card.style.order = index;  // cards keep the order the photos were picked in, whichever finishes first
  card.dataset.name = name;
  const title = document.createElement("h3");
  title.textContent = `${original.name} → ${name}`;
  const views = document.createElement("div");
  views.className = "views";
  const jpeg = await toJpeg75(blob);
  views.append(figure("Before", objectUrl(original), "before"), figure("After (cloaked)", objectUrl(blob), "after"),
               figure("After, then JPEG 75", objectUrl(jpeg), "jpeg75"));
  const meta = document.createElement("div");
  meta.className = "meta";
  const link = document.createElement("a");
  link.href = objectUrl(blob);
  link.download = name;
  link.textContent = "download";
  link.className = "download-one";
  meta.appendChild(link);
  const kept = document.createElement("span");
  kept.className = "kept";
  meta.appendChild(kept);
  card.append(title, views, meta);
  if (warning) {
    const w = document.createElement("p");
    w.className = "warning photo-warning";
    w.textContent = warning;
    card.appendChild(w);
  }
  $("results").appendChild(card);
  keptAfterJpeg(original, blob, jpeg).then((k) => {
    if (k !== null) kept.textContent = `JPEG 75 keeps about ${Math.round(Math.max(0, k) * 100)} % of the cloak.`;
  }).catch(() => {});
}

// A ZIP of the cloaked PNGs built in the page (stored, no compression: PNGs do not shrink further).
const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

function crc32(bytes) {
  let c = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

async function makeZip(entries) {
  const enc = new TextEncoder();
  const parts = [], central = [];
  let offset = 0, centralSize = 0;
  for (const entry of entries) {
    const data = new Uint8Array(await entry.blob.arrayBuffer());
    const name = enc.encode(entry.name);
    const crc = crc32(data);
    const local = new DataView(new ArrayBuffer(30));
    local.setUint32(0, 0x04034b50, true); local.setUint16(4, 20, true); local.setUint16(6, 0x0800, true);
    local.setUint16(8, 0, true); local.setUint16(10, 0, true); local.setUint16(12, 0x21, true);
    local.setUint32(14, crc, true); local.setUint32(18, data.length, true); local.setUint32(22, data.length, true);
    local.setUint16(26, name.length, true); local.setUint16(28, 0, true);
    parts.push(local.buffer, name, data);
    const cd = new DataView(new ArrayBuffer(46));
    cd.setUint32(0, 0x02014b50, true); cd.setUint16(4, 20, true); cd.setUint16(6, 20, true);
    cd.setUint16(8, 0x0800, true); cd.setUint16(10, 0, true); cd.setUint16(12, 0, true); cd.setUint16(14, 0x21, true);
    cd.setUint32(16, crc, true); cd.setUint32(20, data.length, true); cd.setUint32(24, data.length, true);
    cd.setUint16(28, name.length, true); cd.setUint32(42, offset, true);
    central.push(cd.buffer, name);
    offset += 30 + name.length + data.length;
    centralSize += 46 + name.length;
  }
  const end = new DataView(new ArrayBuffer(22));
  end.setUint32(0, 0x06054b50, true); end.setUint16(8, entries.length, true); end.setUint16(10, entries.length, true);
  end.setUint32(12, centralSize, true); end.setUint32(16, offset, true);
  return new Blob([...parts, ...central, end.buffer], { type: "application/zip" });
}

async function downloadAll() {
  const zip = await makeZip(state.results.slice().sort((a, b) => a.index - b.index));
  const a = document.createElement("a");
  a.href = objectUrl(zip);
  a.download = "noclone-cloaked.zip";
  document.body.appendChild(a);
  a.click();
  a.remove();
}

// ------------------------------------------------------------------------------------------- wiring

function wire() {
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    addFiles(e.dataTransfer.files);
  });
  $("files").addEventListener("change", (e) => { addFiles(e.target.files); e.target.value = ""; });
  $("method").addEventListener("change", showMethodNote);
  $("cloak").addEventListener("click", cloakAll);
  $("cancel").addEventListener("click", cancel);
  $("download-all").addEventListener("click", downloadAll);
  $("clear").addEventListener("click", clearAll);
  $("token").value = state.token;
  $("token-save").addEventListener("click", () => {
    state.token = $("token").value.trim();
    sessionStorage.setItem("noclone-token", state.token);
    loadInfo();
  });
}

wire();
loadInfo();
