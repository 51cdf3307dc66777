// The page of `dalle2 serve`: a prompt's generated images beside the nearest training images; a clicked image can
// be varied or searched by. Captions come from the data set: always set as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let chosen = null;  // {image: dataURL} or {key: "..."}

function status(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

async function call(path, body) {
  const response = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json"},
                                      body: JSON.stringify(body)});
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = typeof answer.detail === "string" ? answer.detail : JSON.stringify(answer.detail);
    throw new Error(`${response.status}: ${detail}`);
  }
  return answer;
}

function choose(img, source) {
  document.querySelectorAll("img.chosen").forEach((other) => other.classList.remove("chosen"));
  img.classList.add("chosen");
  chosen = source;
  $("chosen").textContent = source.key ? `training row ${source.key}` : "a generated image";
  $("vary").disabled = $("search-by").disabled = false;
}

function figure(src, caption, source) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.src = src;
  img.alt = caption;
  img.addEventListener("click", () => choose(img, source));
  const text = document.createElement("figcaption");
  text.textContent = caption;
  fig.append(img, text);
  return fig;
}

function show(box, figures) {
  box.replaceChildren(...figures);
  box.dataset.count = String(figures.length);
  box.dataset.state = "done";
}

async function generated(path, body, label) {
  const box = $("generated");
  box.dataset.state = "loading";
  const answer = await call(path, body);
  show(box, answer.images.map((src, i) => figure(src, `${label} ${i + 1}`, {image: src})));
  const s = answer.sampling;
  return `guidance ${s.prior_cond_scale} / ${s.decoder_cond_scale}, ${s.sampler || "the run's sampler"}`;
}

async function nearest(source) {
  const box = $("nearest");
  box.dataset.state = "loading";
  const answer = await call("/api/search", {source, k: 8});
  show(box, answer.hits.map((hit) => figure(hit.image, `${hit.caption} (${hit.similarity.toFixed(2)})`,
                                            {key: hit.key})));
}

async function attempt(what, work) {
  status(`${what}...`);
  try {
    const results = await Promise.allSettled(work);
    const failed = results.filter((r) => r.status === "rejected");
    if (failed.length) throw failed[0].reason;
    status(`${what}: done${results[0].value ? ` (${results[0].value})` : ""}`);
  } catch (error) {
    status(`${what} failed: ${error.message}`, true);
    document.querySelectorAll("[data-state=loading]").forEach((box) => { box.dataset.state = "error"; });
  }
}

$("generate-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  const body = {prompt, n: Number($("n").value), seed: Number($("seed").value)};
  attempt("Generating", [generated("/api/generate", body, prompt), nearest({prompt})]);
});

$("vary").addEventListener("click", () => {
  attempt("Varying", [generated("/api/vary", {source: chosen, n: Number($("n").value),
                                             seed: Number($("seed").value)}, "variation")]);
});

$("search-by").addEventListener("click", () => attempt("Searching", [nearest(chosen)]));

fetch("/api/info").then((r) => r.json()).then((info) => {
  $("run").textContent = `run ${info.run}, ${info.index_rows} training images indexed`;
}).catch(() => {});
