// The gptgen playground: talks to the public OpenAI-compatible API only (/v1/models,
// /v1/completions, /v1/chat/completions with stream: true), parses the server-sent events itself.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { mode: "complete", model: null, controller: null, conversation: [] };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    state.model = body.data[0].id;
    $("model").textContent = "model: " + state.model + " (context " + body.data[0].max_model_len + ")";
  } catch (e) {
    $("model").textContent = "model: unknown (" + e.message + ")";
  }
}

function samplingFields() {
  const sampler = $("sampler").value;
  const body = { max_tokens: parseInt($("max_tokens").value, 10) || 16 };
  if (sampler === "greedy") {
    body.temperature = 0;
  } else {
    body.temperature = parseFloat($("temperature").value);
    if (sampler === "top_k") body.top_k = parseInt($("top_k").value, 10) || 40;
    if (sampler === "top_p") body.top_p = parseFloat($("top_p").value) || 0.9;
  }
  const seed = $("seed").value.trim();
  if (seed !== "") body.seed = parseInt(seed, 10);
  const n = Math.min(4, Math.max(1, parseInt($("n").value, 10) || 1));
  if (state.mode === "complete" && n > 1) body.n = n;  // choice i is seeded with seed + i by the server
  const stops = $("stop_text").value.split("\n").filter((s) => s.length > 0);
  if (stops.length) body.stop = stops;
  if ($("json_mode").checked) body.response_format = { type: "json_object" };
  for (const name of ["presence_penalty", "frequency_penalty"]) {
    const value = parseFloat($(name).value);
    if (value) body[name] = value;
  }
  if ($("show_probs").checked) {
    if (state.mode === "complete") body.logprobs = 5;
    else { body.logprobs = true; body.top_logprobs = 5; }
  }
  body.stream = true;
  body.stream_options = { include_usage: true };
  if (state.model) body.model = state.model;
  return body;
}

// Reads an SSE response, calling onData(object) for each `data:` event until [DONE]. An error event, or a
// stream that ends without [DONE], throws: the answer was cut short and must not read as done.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error("The stream ended before the answer was complete.");
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const event = JSON.parse(data);
        if (event.error) throw new Error(event.error.message || "The server failed while answering.");
        onData(event);
      }
    }
  }
}

function setBusy(busy, text) {
  $("generate").disabled = busy;
  $("stop").disabled = !busy;
  $("status").textContent = text;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function generate() {
  showError("");
  const body = samplingFields();
  let path, sink;
  if (state.mode === "complete") {
    path = "/v1/completions";
    body.prompt = $("prompt").value;
    $("out-prompt").textContent = body.prompt;
    $("out-text").textContent = "";
    // Choices after the first get an output block each (same prompt, their own text).
    const targets = [$("out-text")];
    $("more-outputs").textContent = "";
    for (let i = 1; i < (body.n || 1); i++) {
      const pre = document.createElement("pre");
      pre.className = "choice";
      const prompt = document.createElement("span");
      prompt.className = "choice-prompt";
      prompt.textContent = body.prompt;
      const text = document.createElement("span");
      text.className = "choice-text";
      pre.append(prompt, text);
      $("more-outputs").appendChild(pre);
      targets.push(text);
    }
    sink = (piece, tokens, index) => { appendTokens(targets[index] || targets[0], piece, tokens); };
  } else {
    const text = $("message").value.trim();
    if (!text) return;
    path = "/v1/chat/completions";
    state.conversation.push({ role: "user", content: text });
    addBubble("user", text);
    $("message").value = "";
    body.messages = state.conversation.slice();
    const bubble = addBubble("assistant", "");
    sink = (piece, tokens) => { appendTokens(bubble, piece, tokens); scrollChat(); };
  }
  state.controller = new AbortController();
  setBusy(true, "generating…");
  const started = performance.now();
  let firstAt = null, tokens = 0, reply = "", finish = null;
  try {
    const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body),
                                         signal: state.controller.signal });
    if (!response.ok) {
      const err = await response.json().catch(() => ({}));
      throw new Error(err.error ? err.error.message : response.status + " " + response.statusText);
    }
    await readEvents(response, (chunk) => {
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      for (const choice of chunk.choices || []) {
        const piece = state.mode === "complete" ? choice.text : (choice.delta && choice.delta.content);
        if (piece) {
          if (firstAt === null) firstAt = performance.now();
          if (!chunk.usage) tokens += 1;
          reply += piece;
          sink(piece, tokenProbs(choice.logprobs), choice.index || 0);
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      showSpeed(tokens, started, firstAt);
    });
    setBusy(false, finish ? "done (" + finish + ")" : "done");
  } catch (e) {
    if (e.name === "AbortError") {
      setBusy(false, "stopped");
    } else {
      setBusy(false, "error");
      showError(e.message);
    }
  } finally {
    state.controller = null;
    if (state.mode === "chat") {
      if (reply) state.conversation.push({ role: "assistant", content: reply });
      else state.conversation.pop();  // no answer: forget the question too
    }
    showSpeed(tokens, started, firstAt);
  }
}

// [{text, p, top: [[text, p], ...]}] from a chunk's logprobs (completions' or chat's shape), or null.
function tokenProbs(logprobs) {
  if (!logprobs) return null;
  if (logprobs.content) {
    return logprobs.content.map((t) => ({ text: t.token, p: Math.exp(t.logprob),
      top: (t.top_logprobs || []).map((a) => [a.token, Math.exp(a.logprob)]) }));
  }
  return logprobs.tokens.map((text, i) => ({ text, p: Math.exp(logprobs.token_logprobs[i]),
    top: Object.entries(logprobs.top_logprobs[i] || {}).map(([k, v]) => [k, Math.exp(v)]) }));
}

// Appends a piece of answer: as plain text, or as one span per token coloured by its probability (red:
// unlikely, green: likely) with the top alternatives in its tooltip. Tokens join into the piece.
function appendTokens(target, piece, tokens) {
  const joined = tokens ? tokens.map((t) => t.text).join("") : null;
  if (!tokens || joined !== piece) {
    target.appendChild(document.createTextNode(piece));
    return;
  }
  for (const t of tokens) {
    const span = document.createElement("span");
    span.className = "tok";
    span.textContent = t.text;
    span.style.background = "hsl(" + Math.round(120 * t.p) + ", 70%, 85%)";
    span.title = (100 * t.p).toFixed(1) + "%" + t.top.map(([text, p]) =>
      "\n" + JSON.stringify(text) + " " + (100 * p).toFixed(1) + "%").join("");
    target.appendChild(span);
  }
}

function showSpeed(tokens, started, firstAt) {
  if (!tokens) return;
  const now = performance.now();
  const seconds = Math.max((now - started) / 1000, 1e-3);
  const ttft = firstAt === null ? "" : ", first token " + Math.round(firstAt - started) + " ms";
  $("speed").textContent = tokens + " tokens, " + (tokens / seconds).toFixed(1) + " tokens/s" + ttft;
}

function addBubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("conversation").appendChild(div);
  scrollChat();
  return div;
}

function scrollChat() {
  const c = $("conversation");
  c.scrollTop = c.scrollHeight;
}

function setMode(mode) {
  state.mode = mode;
  $("mode-complete").classList.toggle("active", mode === "complete");
  $("mode-chat").classList.toggle("active", mode === "chat");
  $("mode-complete").setAttribute("aria-selected", String(mode === "complete"));
  $("mode-chat").setAttribute("aria-selected", String(mode === "chat"));
  $("complete-pane").hidden = mode !== "complete";
  $("chat-pane").hidden = mode !== "chat";
  $("reset").hidden = mode !== "chat";
  $("generate").textContent = mode === "chat" ? "Send" : "Generate";
  $("n").disabled = mode !== "complete";  // a chat turn has one reply
}

$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
$("reset").addEventListener("click", () => { state.conversation = []; $("conversation").textContent = ""; });
$("mode-complete").addEventListener("click", () => setMode("complete"));
$("mode-chat").addEventListener("click", () => setMode("chat"));
$("temperature").addEventListener("input", () => { $("temperature-value").textContent = $("temperature").value; });
// Controls that do not apply to the chosen sampler are disabled: greedy ignores temperature, top-k and top-p.
function updateControls() {
  const sampler = $("sampler").value;
  $("temperature").disabled = sampler === "greedy";
  $("top_k").disabled = sampler !== "top_k";
  $("top_p").disabled = sampler !== "top_p";
}
$("sampler").addEventListener("change", updateControls);
updateControls();
$("api_key").addEventListener("change", loadModel);
for (const id of ["prompt", "message"]) {
  $(id).addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey || (id === "message" && !e.shiftKey))) {
      e.preventDefault();
      if (!$("generate").disabled) generate();
    }
  });
}
loadModel();
