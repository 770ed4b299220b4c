// The demo page: streams /v1/completions with the `cast` extension's per-step records and draws them.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const MAX_STEPS_SHOWN = 60;  // older steps' trees leave the page
let modelId = null;
let run = null;  // the request in flight: {controller, started, text, tokens, fromDraft, steps}

async function init() {
  const response = await fetch("/v1/models");
  const model = (await response.json()).data[0];
  modelId = model.id;
  $("model").textContent = `model ${model.id}, context ${model.cast.max_context} tokens`;
  for (const name of model.cast.policies) {
    const option = new Option(name, name, false, name === model.cast.default_policy);
    $("policy").add(option);
  }
  $("generate").onclick = generate;
  $("stop").onclick = () => run && run.controller.abort();
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function generate() {
  const prompt = $("prompt").value;
  run = {controller: new AbortController(), started: performance.now(), text: "", tokens: 0, fromDraft: 0, steps: 0};
  const completion = Object.assign(document.createElement("span"), {id: "completion"});
  $("output").replaceChildren(span(prompt, "prompt"), completion);
  $("steps").replaceChildren();
  updateStats();
  $("generate").disabled = true;
  $("stop").disabled = false;
  setStatus("generating…");
  const body = {
    model: modelId, prompt, stream: true, stream_options: {include_usage: true},
    max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value),
    cast: {policy: $("policy").value, step_stats: true},
  };
  try {
    const response = await fetch("/v1/completions", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
      signal: run.controller.signal,
    });
    if (!response.ok) {
      const error = (await response.json()).error;
      throw new Error(`${response.status}: ${error.message}`);
    }
    await readEvents(response.body, onEvent);
  } catch (error) {
    setStatus(error.name === "AbortError" ? "stopped" : String(error.message || error), error.name !== "AbortError");
  } finally {
    $("generate").disabled = false;
    $("stop").disabled = true;
  }
}

// Server-sent events: `data: {...}` blocks separated by a blank line, the last one `data: [DONE]`.
async function readEvents(stream, handle) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (line.startsWith("data: ")) handle(line.slice(6));
      }
    }
  }
}

function onEvent(data) {
  if (data === "[DONE]") return;
  const message = JSON.parse(data);
  if (message.error) throw new Error(message.error.message);
  if (message.usage) {  // the last event: usage alone
    $("tokens").textContent = message.usage.completion_tokens;
    return;
  }
  const choice = message.choices[0];
  run.text += choice.text;
  const step = message.cast.step;
  if (step) {
    run.steps += 1;
    for (const token of step.tokens) {
      $("completion").append(span(token.text, token.source));
      run.tokens += 1;
      if (token.source === "draft") run.fromDraft += 1;
    }
    drawStep(step, run.steps);
  }
  updateStats();
  if (choice.finish_reason) {
    reconcile(run.text);
    setStatus(`done (${choice.finish_reason})`);
  }
}

// The tokens' texts are for colouring; the completion is the `text` the API streamed. They agree, but where a stop
// string cut the text the last tokens show more: cut the coloured spans to the completion's length.
function reconcile(text) {
  const completion = $("completion");
  if (completion.textContent === text) return;
  if (!completion.textContent.startsWith(text)) {
    completion.replaceChildren(text);
    return;
  }
  let left = text.length;
  for (const node of [...completion.childNodes]) {
    const length = node.textContent.length;
    if (left <= 0) node.remove();
    else if (length > left) node.textContent = node.textContent.slice(0, left);
    left -= length;
  }
}

function updateStats() {
  const seconds = (performance.now() - run.started) / 1000;
  $("tokens").textContent = run.tokens;
  $("step-count").textContent = run.steps;
  $("per-step").textContent = run.steps ? (run.tokens / run.steps).toFixed(2) : "–";
  $("from-draft").textContent = run.tokens ? `${Math.round(100 * run.fromDraft / run.tokens)}%` : "–";
  $("rate").textContent = run.tokens && seconds > 0 ? (run.tokens / seconds).toFixed(1) : "–";
}

function span(text, className) {
  const element = document.createElement("span");
  element.className = className;
  element.textContent = text;
  return element;
}

function visible(text) {
  return text.replace(/\n/g, "↵").replace(/ /g, "·").replace(/\t/g, "→") || "∅";
}

// One step: the verified tree laid out by depth (x) and leaf order (y), its accepted path and the bonus token.
function drawStep(step, number) {
  const {tokens, parents, texts} = step.tree;
  const children = tokens.map(() => []);
  parents.forEach((parent, node) => { if (parent >= 0) children[parent].push(node); });
  const accepted = new Set([0, ...step.accepted_path]);
  const depth = [], row = [];
  let rows = 0;
  (function place(node, d) {  // parents precede children: a depth-first walk from the root
    depth[node] = d;
    if (!children[node].length) row[node] = rows++;
    for (const child of children[node]) place(child, d + 1);
    if (children[node].length) row[node] = row[children[node][0]];
  })(0, 0);
  const bonus = step.tokens.find((token) => token.source === "bonus");
  const last = step.accepted_path.length ? step.accepted_path[step.accepted_path.length - 1] : 0;
  const columns = Math.max(...depth) + (bonus ? 2 : 1);
  const colWidth = 60, rowHeight = 18;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("width", columns * colWidth + 4);
  svg.setAttribute("height", (rows + (bonus ? 1 : 0)) * rowHeight + 4);  // the bonus token on a row of its own
  const at = (d, r) => [2 + d * colWidth, 2 + r * rowHeight];
  const line = (from, to, color, dashed) => {
    const element = document.createElementNS(SVG, "line");
    const [x1, y1] = at(...from), [x2, y2] = at(...to);
    Object.entries({x1: x1 + colWidth - 8, y1: y1 + rowHeight / 2, x2, y2: y2 + rowHeight / 2, stroke: color})
      .forEach(([k, v]) => element.setAttribute(k, v));
    if (dashed) element.setAttribute("stroke-dasharray", "3 2");
    svg.append(element);
  };
  const box = (d, r, text, fill, stroke) => {
    const [x, y] = at(d, r);
    const rect = document.createElementNS(SVG, "rect");
    Object.entries({x, y: y + 1, width: colWidth - 8, height: rowHeight - 2, rx: 3, fill, stroke})
      .forEach(([k, v]) => rect.setAttribute(k, v));
    const label = document.createElementNS(SVG, "text");
    label.setAttribute("x", x + 3);
    label.setAttribute("y", y + rowHeight - 5);
    label.textContent = visible(text).slice(0, 7);
    const title = document.createElementNS(SVG, "title");
    title.textContent = JSON.stringify(text);
    rect.append(title);
    svg.append(rect, label);
  };
  parents.forEach((parent, node) => {
    if (parent >= 0) line([depth[parent], row[parent]], [depth[node], row[node]], accepted.has(node) ? "#2e8b57" : "#adb5bd");
  });
  tokens.forEach((_, node) => {
    const onPath = accepted.has(node) && node > 0;
    box(depth[node], row[node], texts[node], node === 0 ? "#e9ecef" : onPath ? "#c8f0c8" : "#fff",
        onPath ? "#2e8b57" : "#ced4da");
  });
  if (bonus) {
    line([depth[last], row[last]], [depth[last] + 1, rows], "#d9480f", true);
    box(depth[last] + 1, rows, bonus.text, "#ffd8a8", "#d9480f");
  }
  const head = document.createElement("div");
  head.className = "head";
  const drafted = step.verified_nodes > 1  // node 0, the root, is the last committed token
    ? `${step.verified_nodes - 1} of ${step.expanded_nodes - 1} drafted tokens verified, depth ${step.depth}`
    : "no draft (a plain decoding step)";
  head.textContent = `step ${number}: ${drafted}; ${step.accepted_path.length} accepted + ${bonus ? 1 : 0} bonus`;
  const element = document.createElement("div");
  element.className = "step";
  element.append(head, svg);
  $("steps").prepend(element);
  while ($("steps").children.length > MAX_STEPS_SHOWN) $("steps").lastChild.remove();
}

init().catch((error) => setStatus(`could not reach the API: ${error.message}`, true));
