// The page: choose a video (an example of the server or an upload), ask, watch the answer stream in, ask more.
// Talks only to this server: /v1/examples, /v1/uploads, /v1/chat/completions (stream: true, read with fetch).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { videoUrl: null, messages: [], model: null, busy: false };

function setStatus(text) { $("status").textContent = text; }

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

function chooseVideo(url, label) {
  state.videoUrl = url;
  state.messages = [];
  $("log").textContent = "";
  $("video-name").textContent = url ? "video: " + label : "no video chosen: a text-only chat";
}

async function loadInfo() {
  const models = await (await fetch("/v1/models")).json();
  state.model = models.data[0].id;
  $("model").textContent = state.model;
  const examples = await (await fetch("/v1/examples")).json();
  for (const ex of examples.data) {
    const opt = document.createElement("option");
    opt.value = ex.url;
    opt.textContent = ex.name;
    $("video-select").appendChild(opt);
  }
}

$("video-select").addEventListener("change", (e) => {
  const opt = e.target.selectedOptions[0];
  $("preview").hidden = true;
  chooseVideo(opt.value || null, opt.textContent);
});

$("video-file").addEventListener("change", async (e) => {
  const file = e.target.files[0];
  if (!file) return;
  setStatus("uploading " + file.name + "...");
  const form = new FormData();
  form.append("file", file);
  const resp = await fetch("/v1/uploads", { method: "POST", body: form });
  const body = await resp.json();
  if (!resp.ok) { setStatus("upload failed: " + body.error.message); return; }
  $("video-select").value = "";
  if (file.type.startsWith("video/")) {
    $("preview").src = URL.createObjectURL(file);
    $("preview").hidden = false;
  }
  chooseVideo(body.url, file.name);
  setStatus("uploaded " + file.name);
});

// A new conversation about the same video.
$("reset").addEventListener("click", () => {
  chooseVideo(state.videoUrl, $("video-name").textContent.replace(/^video: /, ""));
});

function requestMessages(question) {
  const turns = state.messages.concat([{ role: "user", content: question }]);
  return turns.map((m, i) => {
    if (i !== 0 || !state.videoUrl) return m;
    return { role: "user", content: [{ type: "video_url", video_url: { url: state.videoUrl } },
                                     { type: "text", text: m.content }] };
  });
}

// Reads the server-sent events of a streaming answer, calling onText for each piece of text.
async function readStream(resp, onText) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") return finish;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices) {
        if (choice.delta && choice.delta.content) onText(choice.delta.content);
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  }
  return finish;
}

$("ask-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const question = $("question").value.trim();
  if (!question || state.busy) return;
  state.busy = true;
  $("ask").disabled = true;
  $("question").value = "";
  addMessage("user", question);
  const bubble = addMessage("assistant", "");
  setStatus("answering...");
  let answer = "";
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: state.model, messages: requestMessages(question), stream: true,
                             max_tokens: Number($("max-tokens").value) || 256,
                             temperature: Number($("temperature").value) }),
    });
    if (!resp.ok) {
      const body = await resp.json();
      throw new Error(body.error ? body.error.message : resp.statusText);
    }
    bubble.dataset.pieces = "0";  // how many streamed pieces built the answer (the browser test reads it)
    const finish = await readStream(resp, (piece) => {
      answer += piece;
      bubble.textContent = answer;
      bubble.dataset.pieces = String(Number(bubble.dataset.pieces) + 1);
    });
    state.messages.push({ role: "user", content: question }, { role: "assistant", content: answer });
    setStatus("done (" + (finish || "?") + ")");
  } catch (err) {
    bubble.className = "msg error";
    bubble.textContent = "error: " + err.message;
    setStatus("error");
  } finally {
    state.busy = false;
    $("ask").disabled = false;
  }
});

loadInfo().catch((err) => setStatus("cannot reach the server: " + err.message));
