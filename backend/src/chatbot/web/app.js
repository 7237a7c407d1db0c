// The chat page: the caller's conversations, answers streamed as they are written and
// rendered as Markdown, and on each answer a badge with its time to first token, the share of
// its prompt read from the KV cache (and of it, what was read while the user was still
// writing), and the agent that wrote it.
//
// Answers come as Server-Sent Events in the response to a POST, which EventSource cannot
// send: they are read from fetch()'s body stream instead.
//
// What the user is writing, attached files included, goes to the server as a draft while
// they write (PUT .../draft), so that the server has read most of the prompt by Enter.

const KEY_STORAGE = "chatbot.apiKey";
const THEME_STORAGE = "chatbot.theme";
const DEFAULT_TITLE = "New conversation";
const TITLE_CHARS = 60;
const PAGE_SIZE = 50;
// A draft goes when the user pauses, or once the text has grown by a few words, but never
// more than once a second (pasting and attaching send one at once).
const DRAFT_PAUSE_MS = 300;
const DRAFT_WORDS = 3;
const DRAFT_INTERVAL_MS = 1000;
const ATTACHABLE = /\.(txt|md)$/i;
// The control characters a message may not hold (all but tab, line feed, carriage return).
const CONTROLS = /[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f]/g;

const $ = (id) => document.getElementById(id);
const ui = {
  list: $("conversation-list"),
  loadMore: $("load-more"),
  newConversation: $("new-conversation"),
  title: $("conversation-title"),
  rename: $("rename-conversation"),
  remove: $("delete-conversation"),
  notice: $("notice"),
  messages: $("messages"),
  composer: $("composer"),
  input: $("message-input"),
  send: $("send"),
  stop: $("stop"),
  attach: $("attach"),
  attachInput: $("attach-input"),
  attachments: $("attachments"),
  themeToggle: $("theme-toggle"),
  changeKey: $("change-key"),
  keyDialog: $("key-dialog"),
  keyReason: $("key-dialog-reason"),
  keyInput: $("key-input"),
  renameDialog: $("rename-dialog"),
  renameInput: $("rename-input"),
  deleteDialog: $("delete-dialog"),
  deleteName: $("delete-name"),
};

const state = {
  conversations: [], // newest first, as the server lists them
  hasMore: false,
  currentId: null,
  stream: null, // {controller, conversationId} while an answer is being written
  creating: null, // the conversation being created, as a promise of its id
  attachments: [], // {name, text}: files whose text goes in with the next message
};

// The draft last sent, for which conversation and when; a timer for the next.
const draft = { timer: null, text: "", conversationId: null, at: 0, inFlight: false, again: false, off: false };

// --- Markdown ---------------------------------------------------------------------------

// Set once both libraries have loaded; until then, or when they are not installed on the
// server, answers are shown as plain text.
let renderMarkdown = null;

async function loadMarkdown() {
  try {
    const [{ marked }, { default: DOMPurify }] = await Promise.all([
      import("/static/vendor/marked.esm.js"),
      import("/static/vendor/purify.es.mjs"),
    ]);
    // The model's text is untrusted: marked passes raw HTML through, DOMPurify removes
    // scripts, event handlers and javascript: links from the result.
    renderMarkdown = (text) => DOMPurify.sanitize(marked.parse(text, { gfm: true }));
  } catch (error) {
    console.warn("The Markdown libraries are not available: answers are shown as plain text.", error);
  }
}

function setBody(body, text, { markdown = true } = {}) {
  if (markdown && renderMarkdown) {
    body.innerHTML = renderMarkdown(text);
    body.classList.remove("plain");
  } else {
    body.textContent = text;
    body.classList.add("plain");
  }
}

// --- The API ------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function apiError(response) {
  let detail = {};
  try {
    detail = (await response.json()).error ?? {};
  } catch {
    // Not the API's JSON error (a proxy's page, say): the status says enough.
  }
  const message = detail.message || `${response.status} ${response.statusText}`.trim();
  return new ApiError(response.status, message, detail.code);
}

async function fetchApi(method, path, body, signal) {
  const headers = {};
  const key = localStorage.getItem(KEY_STORAGE);
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
  });
  if (!response.ok) throw await apiError(response);
  return response;
}

// A request that the server refuses for want of a key asks for one and goes again; a
// server without keys never asks.
async function request(method, path, body, signal) {
  for (;;) {
    try {
      return await fetchApi(method, path, body, signal);
    } catch (error) {
      if (!(error instanceof ApiError) || error.status !== 401) throw error;
      const reason = localStorage.getItem(KEY_STORAGE)
        ? "The server refused this key. Enter a valid API key."
        : "This server needs an API key.";
      if (!(await askForKey(reason))) throw error;
    }
  }
}

async function requestJson(method, path, body) {
  const response = await request(method, path, body);
  return response.status === 204 ? null : response.json();
}

let keyPrompt = null; // one dialog for every request refused at once

function askForKey(reason) {
  keyPrompt ??= new Promise((resolve) => {
    ui.keyReason.textContent = reason;
    ui.keyInput.value = "";
    ui.keyDialog.returnValue = "";
    ui.keyDialog.addEventListener(
      "close",
      () => {
        keyPrompt = null;
        const key = ui.keyInput.value.trim();
        ui.keyInput.value = "";
        if (ui.keyDialog.returnValue === "save" && key) {
          localStorage.setItem(KEY_STORAGE, key);
          resolve(true);
        } else {
          resolve(false);
        }
      },
      { once: true },
    );
    ui.keyDialog.showModal();
  });
  return keyPrompt;
}

// Server-Sent Events from a response body: [event name, decoded data] for each event.
async function* readEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replaceAll("\r\n", "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield [event, JSON.parse(data.join("\n"))];
    }
  }
}

// --- Messages -----------------------------------------------------------------------------

function formatShare(cached, prompt) {
  return `${((100 * cached) / prompt).toFixed(1)}%`;
}

function setBadge(element, { usage, timing, agent }) {
  const parts = [];
  if (timing?.ttft_ms != null) parts.push(`TTFT ${Math.round(timing.ttft_ms)} ms`);
  if (usage?.prompt_tokens) parts.push(`cached ${formatShare(usage.cached_tokens, usage.prompt_tokens)}`);
  if (usage?.prompt_tokens && usage.draft_tokens) parts.push(`draft ${formatShare(usage.draft_tokens, usage.prompt_tokens)}`);
  if (agent) parts.push(agent);
  const badge = element.querySelector(".badge");
  badge.hidden = parts.length === 0;
  badge.textContent = parts.join(" · ");
  if (usage?.prompt_tokens) {
    const tier = usage.cache_tier ? ` (${usage.cache_tier})` : "";
    const drafted = usage.draft_tokens ? `, ${usage.draft_tokens} of them read while you were writing` : "";
    badge.title =
      `${usage.cached_tokens} of ${usage.prompt_tokens} prompt tokens reused from the KV cache${tier}${drafted}; ` +
      `${usage.completion_tokens} tokens written`;
  }
}

function setStatus(element, status) {
  element.dataset.status = status;
  const note = element.querySelector(".status-note");
  const notes = { cancelled: "Stopped", failed: "Failed", waiting: "Waiting…", streaming: "Writing…" };
  note.textContent = notes[status] ?? "";
  note.hidden = !note.textContent;
}

function messageElement({ role, content = "", status = "complete" }) {
  const element = document.createElement("article");
  element.className = `message ${role}`;
  element.setAttribute("aria-label", role === "user" ? "You" : "Answer");
  const body = document.createElement("div");
  body.className = "message-body";
  element.append(body);
  if (role === "user") {
    setBody(body, content, { markdown: false });
    return element;
  }
  const foot = document.createElement("div");
  foot.className = "message-foot";
  const badge = document.createElement("span");
  badge.className = "badge";
  badge.hidden = true;
  const note = document.createElement("span");
  note.className = "status-note";
  foot.append(badge, note);
  element.append(foot);
  setBody(body, content);
  setStatus(element, status);
  return element;
}

function storedMessageElement(message) {
  const element = messageElement(message);
  if (message.role === "assistant") {
    element.dataset.messageId = message.id;
    setBadge(element, message);
    if (message.status === "failed") {
      showAnswerError(element, message.error === "interrupted" ? "The server stopped in the middle of this answer." : "This answer failed.");
    }
  }
  return element;
}

function showAnswerError(element, message, retry) {
  setStatus(element, "failed");
  element.querySelector(".message-error")?.remove();
  const box = document.createElement("div");
  box.className = "message-error";
  box.setAttribute("role", "alert");
  const text = document.createElement("p");
  text.textContent = message;
  box.append(text);
  if (retry) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "retry";
    button.textContent = "Retry";
    button.addEventListener("click", () => {
      if (!state.stream) retry();
    });
    box.append(button);
  }
  element.append(box);
}

function describe(error) {
  if (error instanceof ApiError) {
    if (error.status === 409) return "An answer is still being written in this conversation. Try again in a moment.";
    return error.message;
  }
  return `The connection failed: ${error.message}`;
}

function showEmptyHint() {
  const hint = document.createElement("p");
  hint.className = "empty";
  hint.textContent = state.currentId
    ? "No messages yet: type one below."
    : "Start a conversation: type a message below.";
  ui.messages.replaceChildren(hint);
}

function appendMessage(element) {
  ui.messages.querySelector(".empty")?.remove();
  ui.messages.append(element);
  scrollToEnd();
}

function scrollToEnd() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

// --- Notices ------------------------------------------------------------------------------

function showNotice(message) {
  ui.notice.textContent = message;
  ui.notice.hidden = false;
}

function clearNotice() {
  ui.notice.hidden = true;
  ui.notice.textContent = "";
}

// --- Conversations ------------------------------------------------------------------------

function current() {
  return state.conversations.find((c) => c.id === state.currentId) ?? null;
}

function renderList() {
  const items = state.conversations.map((conversation) => {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.id = conversation.id;
    button.textContent = conversation.title;
    button.title = conversation.title;
    button.setAttribute("aria-current", String(conversation.id === state.currentId));
    button.addEventListener("click", () => selectConversation(conversation.id));
    item.append(button);
    return item;
  });
  ui.list.replaceChildren(...items);
  ui.loadMore.hidden = !state.hasMore;
  const selected = current();
  ui.title.textContent = selected ? selected.title : "No conversation selected";
  ui.rename.disabled = ui.remove.disabled = !selected;
}

async function loadConversations({ more = false } = {}) {
  const last = state.conversations.at(-1);
  const after = more && last ? `&after=${encodeURIComponent(last.id)}` : "";
  const page = await requestJson("GET", `/v1/conversations?limit=${PAGE_SIZE}${after}`);
  const open = current();
  state.conversations = more ? [...state.conversations, ...page.data] : page.data;
  // The open conversation stays listed even when it is no longer on the first page.
  if (open && !state.conversations.some((c) => c.id === open.id)) state.conversations.push(open);
  state.hasMore = page.has_more;
  renderList();
}

async function selectConversation(id) {
  if (state.stream && state.stream.conversationId !== id) stopAnswer();
  state.currentId = id;
  scheduleDraft(); // what is in the composer now drafts a message in this conversation
  clearNotice();
  renderList();
  ui.messages.replaceChildren();
  ui.messages.setAttribute("aria-busy", "true");
  try {
    const { data } = await requestJson("GET", `/v1/conversations/${id}/messages`);
    if (state.currentId !== id) return; // another was chosen meanwhile
    if (data.length) ui.messages.replaceChildren(...data.map(storedMessageElement));
    else showEmptyHint();
    scrollToEnd();
  } catch (error) {
    showNotice(`The messages could not be loaded: ${describe(error)}`);
  } finally {
    ui.messages.setAttribute("aria-busy", "false");
  }
  ui.input.focus();
}

async function createConversation(title = DEFAULT_TITLE) {
  const conversation = await requestJson("POST", "/v1/conversations", { title });
  state.conversations = [conversation, ...state.conversations.filter((c) => c.id !== conversation.id)];
  return conversation;
}

// The open conversation's id; with none open, a new one (titled ``title``) is created, once
// however many ask for it at the same time (a draft and the message).
async function openConversation(title) {
  if (state.currentId) return state.currentId;
  state.creating ??= createConversation(title)
    .then((conversation) => {
      state.currentId = conversation.id;
      renderList();
      ui.messages.replaceChildren();
      return conversation.id;
    })
    .finally(() => {
      state.creating = null;
    });
  return state.creating;
}

function titleFrom(content) {
  const line = content.trim().split("\n")[0];
  return line.length > TITLE_CHARS ? `${line.slice(0, TITLE_CHARS - 1).trimEnd()}…` : line;
}

async function renameConversation(id, title) {
  const renamed = await requestJson("PATCH", `/v1/conversations/${id}`, { title });
  state.conversations = state.conversations.map((c) => (c.id === id ? renamed : c));
  renderList();
}

async function deleteConversation(id) {
  if (state.stream?.conversationId === id) stopAnswer();
  await requestJson("DELETE", `/v1/conversations/${id}`);
  state.conversations = state.conversations.filter((c) => c.id !== id);
  if (state.currentId === id) {
    state.currentId = null;
    showEmptyHint();
  }
  renderList();
}

// --- Sending and stopping -----------------------------------------------------------------

function setStreaming(streaming) {
  ui.send.hidden = streaming;
  ui.stop.hidden = !streaming;
  ui.messages.setAttribute("aria-busy", String(streaming));
  for (const button of ui.messages.querySelectorAll("button.retry")) button.disabled = streaming;
}

async function send(content) {
  if (state.stream) return;
  clearNotice();
  let id;
  try {
    id = await openConversation(titleFrom(content));
    if (current()?.title === DEFAULT_TITLE && !ui.messages.querySelector(".message")) {
      // A conversation's first message names it, until the user renames it.
      await renameConversation(id, titleFrom(content));
    }
  } catch (error) {
    showNotice(`The message could not be sent: ${describe(error)}`);
    ui.input.value ||= content;
    return;
  }
  const question = messageElement({ role: "user", content });
  const answer = messageElement({ role: "assistant", status: "waiting" });
  appendMessage(question);
  appendMessage(answer);
  await streamAnswer(id, content, question, answer);
}

async function streamAnswer(conversationId, content, question, answer) {
  const controller = new AbortController();
  state.stream = { controller, conversationId };
  setStreaming(true);
  const body = answer.querySelector(".message-body");
  let text = "";
  let ended = false;
  // A failed answer and its question are left out of later prompts: a retry sends the
  // question again in their place.
  const retry = () => {
    question.remove();
    answer.remove();
    send(content);
  };
  try {
    const response = await request(
      "POST",
      `/v1/conversations/${conversationId}/messages`,
      { content, stream: true },
      controller.signal,
    );
    for await (const [event, data] of readEvents(response.body)) {
      if (event === "message.start") {
        answer.dataset.messageId = data.message_id;
        setStatus(answer, "streaming");
        setBadge(answer, { agent: data.agent });
      } else if (event === "token") {
        text += data.delta;
        setBody(body, text);
        scrollToEnd();
      } else if (event === "message.end") {
        ended = true;
        setBody(body, data.content);
        setBadge(answer, data);
        setStatus(answer, data.status);
      } else if (event === "error") {
        ended = true;
        showAnswerError(answer, data.error?.message ?? "The answer failed.", retry);
      }
    }
    if (!ended) throw new Error("the stream ended before the answer did");
  } catch (error) {
    if (controller.signal.aborted) {
      // The server stops the answer when the stream closes, and keeps what was written.
      setStatus(answer, "cancelled");
    } else {
      showAnswerError(answer, describe(error), retry);
    }
  } finally {
    state.stream = null;
    setStreaming(false);
    scrollToEnd();
    scheduleDraft(); // what the user wrote meanwhile
  }
  // The list is ordered by the server, which may have moved this conversation.
  loadConversations().catch(() => {});
}

function stopAnswer() {
  state.stream?.controller.abort();
}

// --- Drafts and attachments -----------------------------------------------------------------

// The message as it would be sent now: the attached files' text first, then what is typed,
// so that typing only adds to what the server has read.
function composed(question = ui.input.value) {
  const files = state.attachments.map(({ name, text }) => `Attached file ${name}:\n\n${text.trim()}`);
  return [...files, question].filter((part) => part.trim()).join("\n\n");
}

function words(text) {
  return text.split(/\s+/).filter(Boolean).length;
}

// Called at every change of the composer; ``now``: paste and attach, which send at once.
function scheduleDraft({ now = false } = {}) {
  clearTimeout(draft.timer);
  if (draft.off || state.stream) return; // an answer is being written: its turn comes first
  const content = composed();
  if (!content.trim()) {
    dropDraft();
    return;
  }
  if (content === draft.text && draft.conversationId === state.currentId) return;
  const since = Date.now() - draft.at;
  const grown = words(content) - words(draft.text) >= DRAFT_WORDS;
  if (now || (grown && since >= DRAFT_INTERVAL_MS)) {
    sendDraft();
  } else {
    draft.timer = setTimeout(sendDraft, Math.max(DRAFT_PAUSE_MS, DRAFT_INTERVAL_MS - since));
  }
}

// A draft is a hint: whatever goes wrong, the message still goes as usual, so failures are
// not shown (and a draft never asks for a key).
async function sendDraft() {
  clearTimeout(draft.timer);
  if (draft.inFlight) {
    draft.again = true; // one at a time: the newest text goes once this one is answered
    return;
  }
  const content = composed();
  if (!content.trim() || state.stream || draft.off) return;
  draft.inFlight = true;
  try {
    const id = await openConversation(DEFAULT_TITLE);
    Object.assign(draft, { text: content, conversationId: id, at: Date.now() });
    const response = await fetchApi("PUT", `/v1/conversations/${id}/draft`, { content });
    const { status, reason } = await response.json();
    if (status === "skipped" && reason === "disabled") draft.off = true;
  } catch (error) {
    console.debug("a draft was not sent", error);
  } finally {
    draft.inFlight = false;
  }
  if (draft.again) {
    draft.again = false;
    scheduleDraft();
  }
}

// The user cleared what they wrote: the server stops reading it.
function dropDraft() {
  const { text, conversationId } = draft;
  Object.assign(draft, { text: "", conversationId: null });
  if (!text || !conversationId || draft.off) return;
  fetchApi("DELETE", `/v1/conversations/${conversationId}/draft`).catch((error) =>
    console.debug("a draft was not dropped", error),
  );
}

// The message went: it ends its draft on the server.
function draftSent() {
  clearTimeout(draft.timer);
  Object.assign(draft, { text: "", conversationId: null });
  state.attachments = [];
  renderAttachments();
}

async function attach(files) {
  const refused = [];
  for (const file of files) {
    if (!ATTACHABLE.test(file.name)) {
      refused.push(file.name);
      continue;
    }
    // Control characters would be refused with the message; a file's line breaks stay.
    const text = (await file.text()).replace(CONTROLS, "");
    state.attachments.push({ name: file.name, text });
  }
  if (refused.length) showNotice(`Only .txt and .md files can be attached: ${refused.join(", ")}`);
  renderAttachments();
  scheduleDraft({ now: true }); // a long document is read while the question is written
}

function renderAttachments() {
  const items = state.attachments.map((attachment) => {
    const item = document.createElement("li");
    item.className = "attachment";
    const name = document.createElement("span");
    name.className = "attachment-name";
    name.textContent = attachment.name;
    name.title = `${attachment.text.length} characters`;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `Remove ${attachment.name}`);
    remove.addEventListener("click", () => {
      state.attachments = state.attachments.filter((a) => a !== attachment);
      renderAttachments();
      scheduleDraft({ now: true });
    });
    item.append(name, remove);
    return item;
  });
  ui.attachments.replaceChildren(...items);
  ui.attachments.hidden = items.length === 0;
}

// --- Theme --------------------------------------------------------------------------------

const darkScheme = matchMedia("(prefers-color-scheme: dark)");

function applyTheme() {
  const theme = localStorage.getItem(THEME_STORAGE) ?? (darkScheme.matches ? "dark" : "light");
  document.documentElement.dataset.theme = theme;
  ui.themeToggle.setAttribute("aria-pressed", String(theme === "dark"));
}

// --- Wiring -------------------------------------------------------------------------------

function wire() {
  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    const content = composed();
    if (!content.trim() || state.stream) return;
    ui.input.value = "";
    draftSent();
    send(content);
  });
  ui.input.addEventListener("input", () => scheduleDraft());
  // After the paste is in the field: the input event of a paste follows it.
  ui.input.addEventListener("paste", () => setTimeout(() => scheduleDraft({ now: true })));
  ui.attach.addEventListener("click", () => ui.attachInput.click());
  ui.attachInput.addEventListener("change", async () => {
    const files = [...ui.attachInput.files];
    ui.attachInput.value = ""; // the same file can be attached again
    await attach(files);
  });
  ui.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      ui.composer.requestSubmit();
    }
  });
  ui.stop.addEventListener("click", stopAnswer);

  ui.newConversation.addEventListener("click", async () => {
    try {
      const conversation = await createConversation();
      await selectConversation(conversation.id);
    } catch (error) {
      showNotice(`The conversation could not be created: ${describe(error)}`);
    }
  });
  ui.loadMore.addEventListener("click", () =>
    loadConversations({ more: true }).catch((error) => showNotice(describe(error))),
  );

  ui.rename.addEventListener("click", () => {
    const selected = current();
    if (!selected) return;
    ui.renameInput.value = selected.title;
    ui.renameDialog.returnValue = "";
    ui.renameDialog.showModal();
    ui.renameInput.select();
  });
  ui.renameDialog.addEventListener("close", async () => {
    const title = ui.renameInput.value.trim();
    const id = state.currentId;
    if (ui.renameDialog.returnValue !== "save" || !title || !id) return;
    try {
      await renameConversation(id, title);
    } catch (error) {
      showNotice(`The conversation could not be renamed: ${describe(error)}`);
    }
  });

  ui.remove.addEventListener("click", () => {
    const selected = current();
    if (!selected) return;
    ui.deleteName.textContent = selected.title;
    ui.deleteDialog.returnValue = "";
    ui.deleteDialog.showModal();
  });
  ui.deleteDialog.addEventListener("close", async () => {
    const id = state.currentId;
    if (ui.deleteDialog.returnValue !== "delete" || !id) return;
    try {
      await deleteConversation(id);
    } catch (error) {
      showNotice(`The conversation could not be deleted: ${describe(error)}`);
    }
  });

  for (const button of document.querySelectorAll("dialog [data-close]")) {
    button.addEventListener("click", () => button.closest("dialog").close());
  }

  ui.changeKey.addEventListener("click", async () => {
    if (await askForKey("Enter the API key to use with this server.")) {
      state.currentId = null;
      showEmptyHint();
      await start();
    }
  });

  ui.themeToggle.addEventListener("click", () => {
    const dark = document.documentElement.dataset.theme === "dark";
    localStorage.setItem(THEME_STORAGE, dark ? "light" : "dark");
    applyTheme();
  });
  darkScheme.addEventListener("change", applyTheme);
}

async function start() {
  try {
    await loadConversations();
  } catch (error) {
    showNotice(`The conversations could not be loaded: ${describe(error)}`);
    return;
  }
  clearNotice();
  if (!state.currentId && state.conversations.length) {
    await selectConversation(state.conversations[0].id);
  }
}

applyTheme();
wire();
await loadMarkdown();
await start();
