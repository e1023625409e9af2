// storyline's web board. Pages are shells: this script fetches their HTML fragments with
// the token kept in sessionStorage (a bearer header, never a cookie), keeps them live from
// /events/stream (fetch + a stream reader: EventSource cannot send headers), and sends
// actions to the JSON API. Fragments are escaped by the server; everything this script
// writes itself goes through textContent.
(() => {
  "use strict";

  const TOKEN_KEY = "storyline-token";
  const CONFLICT_TEXT = "someone changed this story, here is the new state";
  const LOG_POLL_MS = 2000;

  class HttpError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  // ------------------------------------------------------------------ helpers

  function storedToken() {
    try {
      return sessionStorage.getItem(TOKEN_KEY);
    } catch (_) {
      return null;
    }
  }

  function headers(extra) {
    const found = Object.assign({}, extra || {});
    const token = storedToken();
    if (token) found.Authorization = "Bearer " + token;
    return found;
  }

  function debounce(fn, ms) {
    let timer = null;
    return (...args) => {
      clearTimeout(timer);
      timer = setTimeout(() => fn(...args), ms);
    };
  }

  // Runs `fn` once, `ms` after the first call of a burst (a steady stream still updates).
  function throttle(fn, ms) {
    let timer = null;
    return () => {
      if (timer !== null) return;
      timer = setTimeout(() => {
        timer = null;
        fn();
      }, ms);
    };
  }

  function sleep(ms, signal) {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      if (signal) signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); });
    });
  }

  async function errorOf(response) {
    let code = "http_" + response.status;
    let message = "the server answered " + response.status;
    try {
      const body = await response.json();
      if (body && body.error) {
        code = body.error.code || code;
        message = body.error.message || message;
      }
    } catch (_) {
      // not JSON: keep the status line
    }
    return new HttpError(response.status, code, message);
  }

  async function send(url, options) {
    const init = Object.assign({ cache: "no-store", credentials: "omit" }, options || {});
    init.headers = headers(init.headers);
    const response = await fetch(url, init);
    if (response.status === 401) {
      forgetToken();
      showTokenForm();
      throw await errorOf(response);
    }
    return response;
  }

  function forgetToken() {
    try {
      sessionStorage.removeItem(TOKEN_KEY);
    } catch (_) {
      // nothing kept
    }
  }

  function fill(container, nodes) {
    if (nodes) container.replaceChildren(nodes);
    else container.replaceChildren();
  }

  function parse(html) {
    // A template's content is inert: nothing in it runs or loads while it is parsed.
    const template = document.createElement("template");
    template.innerHTML = html;
    return template.content;
  }

  // The fragment's nodes, or null for 204 (a card the filters leave out).
  async function fragment(url) {
    const response = await send(url);
    if (response.status === 204) return null;
    if (!response.ok) throw await errorOf(response);
    return parse(await response.text());
  }

  function query(params) {
    const search = new URLSearchParams();
    for (const [key, value] of Object.entries(params)) {
      if (value !== null && value !== undefined && value !== "") search.set(key, String(value));
    }
    const text = search.toString();
    return text ? "?" + text : "";
  }

  // ------------------------------------------------------------------ messages, token

  function messages() {
    return document.getElementById("messages");
  }

  function message(role, text) {
    let node = messages().querySelector('[data-role="' + role + '"]');
    if (!node) {
      node = document.createElement("p");
      node.dataset.role = role;
      node.className = "message " + role;
      node.setAttribute("role", role === "error" ? "alert" : "status");
      messages().appendChild(node);
    }
    node.textContent = text;
    return node;
  }

  function showError(err) {
    if (err instanceof HttpError && err.status === 401) return; // the token form says it
    message("error", err && err.message ? err.message : String(err));
  }

  function clearMessage(role) {
    const node = messages().querySelector('[data-role="' + role + '"]');
    if (node) node.remove();
  }

  function showTokenForm() {
    const form = document.getElementById("token-form");
    if (!form || !form.hidden) return;
    form.hidden = false;
    setLive("needs a token");
    const input = form.querySelector('input[name="token"]');
    if (input) input.focus();
  }

  function setupTokenForm() {
    const form = document.getElementById("token-form");
    if (!form) return;
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const input = form.querySelector('input[name="token"]');
      const value = input ? input.value.trim() : "";
      if (!value) return;
      try {
        sessionStorage.setItem(TOKEN_KEY, value);
      } catch (_) {
        message("error", "this browser does not let the page keep a token");
        return;
      }
      input.value = "";
      form.hidden = true;
      clearMessage("error");
      start();
    });
  }

  function setLive(text) {
    const node = document.querySelector('[data-role="live"]');
    if (node) node.textContent = text;
  }

  // ------------------------------------------------------------------ live stream

  let stream = null;

  function stopStream() {
    if (stream) stream.abort();
    stream = null;
  }

  // Reads /events/stream until stopped: resumes after a drop with Last-Event-ID, so every
  // event after `after` reaches `onEvent` once, in order (the server replays the gap).
  function startStream(after, onEvent) {
    stopStream();
    const control = new AbortController();
    stream = control;
    let lastId = null;
    let retry = 2000;

    function frame(text) {
      let data = [];
      let id = null;
      for (const line of text.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "id") id = value;
        else if (field === "data") data.push(value);
        else if (field === "retry" && /^[0-9]+$/.test(value)) retry = Number(value);
      }
      if (id !== null) lastId = id;
      if (!data.length) return;
      let event;
      try {
        event = JSON.parse(data.join("\n"));
      } catch (_) {
        return;
      }
      try {
        onEvent(event);
      } catch (err) {
        showError(err);
      }
    }

    (async () => {
      while (!control.signal.aborted) {
        try {
          const extra = { Accept: "text/event-stream" };
          let url = "/events/stream";
          if (lastId !== null) extra["Last-Event-ID"] = lastId;
          else if (after !== null && after !== undefined && after !== "") url += query({ after });
          const response = await fetch(url, {
            headers: headers(extra),
            cache: "no-store",
            credentials: "omit",
            signal: control.signal,
          });
          if (response.status === 401) {
            forgetToken();
            showTokenForm();
            return;
          }
          if (!response.ok || !response.body) throw await errorOf(response);
          setLive("live");
          const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
          let buffer = "";
          for (;;) {
            const { value, done } = await reader.read();
            if (done) break;
            buffer += value.replace(/\r\n?/g, "\n");
            let cut;
            while ((cut = buffer.indexOf("\n\n")) >= 0) {
              frame(buffer.slice(0, cut));
              buffer = buffer.slice(cut + 2);
            }
          }
        } catch (_) {
          if (control.signal.aborted) return;
        }
        if (control.signal.aborted) return;
        setLive("reconnecting…");
        await sleep(retry, control.signal);
      }
    })();
  }

  // ------------------------------------------------------------------ board

  const board = {
    root: null,
    container: null,
    pending: new Map(),

    filters() {
      const text = document.getElementById("filter-text");
      const epic = document.getElementById("filter-epic");
      return { text: text ? text.value.trim() : "", epic: epic ? epic.value : "" };
    },

    async load(initial) {
      const params = new URLSearchParams(location.search);
      const own = initial
        ? {
            stage: params.get("stage"),
            offset: params.get("offset"),
            limit: params.get("limit"),
          }
        : { limit: params.get("limit") };
      const url = this.container.dataset.src + query(Object.assign(own, this.filters()));
      fill(this.container, await fragment(url));
      this.syncEpicOptions();
      const columns = this.container.querySelector('[data-role="columns"]');
      return columns ? columns.dataset.position : null;
    },

    syncEpicOptions() {
      const select = document.getElementById("filter-epic");
      const template = this.container.querySelector('template[data-role="epic-options"]');
      if (!select || !template) return;
      const chosen = select.value;
      const first = select.querySelector('option[value=""]');
      select.replaceChildren();
      if (first) select.appendChild(first);
      for (const option of template.content.querySelectorAll("option")) {
        select.appendChild(option.cloneNode(true));
      }
      select.value = chosen;
    },

    column(stage) {
      return this.root.querySelector('section.column[data-stage="' + CSS.escape(stage) + '"]');
    },

    bump(stage, delta) {
      const col = stage && this.column(stage);
      const count = col && col.querySelector('[data-role="count"]');
      if (count) count.textContent = String(Math.max(Number(count.textContent || 0) + delta, 0));
    },

    // Cards are ordered by priority (highest first), then id: a card that sorts past the
    // last one shown stays off the page while the column has more to show.
    insert(card) {
      const col = this.column(card.dataset.stage);
      if (!col) return;
      const cards = col.querySelector('[data-role="cards"]');
      const priority = Number(card.dataset.priority || 0);
      const id = card.dataset.storyId;
      const shown = cards.querySelectorAll("article.card");
      for (const [index, other] of shown.entries()) {
        const p = Number(other.dataset.priority || 0);
        if (p < priority || (p === priority && other.dataset.storyId > id)) {
          // Before the first card of a later page: it belongs to an earlier page.
          if (index === 0 && Number(col.dataset.offset || 0) > 0) return;
          cards.insertBefore(card, other);
          return;
        }
      }
      if (!col.querySelector('a[data-role="more"]')) cards.appendChild(card);
    },

    find(id) {
      return this.root.querySelector('article.card[data-story-id="' + CSS.escape(id) + '"]');
    },

    onEvent(event) {
      if (event.aggregate === "epic") {
        this.refreshEpics();
        return;
      }
      // The gate registry (quarantines and clears) is the project's, not a story's.
      if (event.aggregate === "project") {
        this.refreshGates();
        return;
      }
      const id = event.story_id;
      let entry = this.pending.get(id);
      if (!entry) {
        // The stage the story left: counts move from there when its card is not shown.
        entry = { from: event.type === "StoryCreated" ? null : event.from_stage, position: 0 };
        this.pending.set(id, entry);
      }
      entry.position = Math.max(entry.position, event.position);
      if (!entry.running) this.refresh(id);
    },

    async refresh(id) {
      const entry = this.pending.get(id);
      entry.running = true;
      try {
        while (entry.position > (entry.done || 0)) {
          const position = entry.position;
          const url =
            "/ui/fragments/card/" + encodeURIComponent(id) +
            query(Object.assign({ after: position }, this.filters()));
          let nodes = null;
          try {
            nodes = await fragment(url);
          } catch (err) {
            if (!(err instanceof HttpError && err.status === 404)) showError(err);
          }
          entry.done = position;
          const card = nodes && nodes.querySelector("article.card");
          if (!card) continue;
          const shown = this.find(id);
          const from = shown ? shown.dataset.stage : entry.from;
          if (from !== card.dataset.stage) {
            if (from) this.bump(from, -1);
            this.bump(card.dataset.stage, 1);
          }
          entry.from = card.dataset.stage;
          if (shown) shown.remove();
          this.insert(card);
        }
      } finally {
        this.pending.delete(id);
      }
    },

    // New epics join the filter's choices; the ones already there (free-text epic labels
    // of cards among them) stay.
    refreshEpics: throttle(async () => {
      try {
        const nodes = await fragment("/ui/fragments/epic-options" + query({ epic: board.filters().epic }));
        const fresh = nodes && nodes.querySelector('template[data-role="epic-options"]');
        const current = board.container.querySelector('template[data-role="epic-options"]');
        if (!fresh || !current) return;
        const known = new Set(Array.from(current.content.querySelectorAll("option"), (o) => o.value));
        for (const option of fresh.content.querySelectorAll("option")) {
          if (!known.has(option.value)) current.content.appendChild(option.cloneNode(true));
        }
        board.syncEpicOptions();
      } catch (err) {
        showError(err);
      }
    }, 500),

    refreshGates: throttle(async () => {
      try {
        const nodes = await fragment("/ui/fragments/quarantined-gates");
        const fresh = nodes && nodes.querySelector('[data-role="gate-banner-slot"]');
        const current = board.container.querySelector('[data-role="gate-banner-slot"]');
        if (fresh && current) current.replaceWith(fresh);
      } catch (err) {
        showError(err);
      }
    }, 500),

    async more(link) {
      const nodes = await fragment(link.dataset.fragment);
      const col = link.closest("section.column");
      const next = nodes && nodes.querySelector("section.column");
      if (!col || !next) return;
      const cards = col.querySelector('[data-role="cards"]');
      for (const card of next.querySelectorAll("article.card")) {
        if (!this.find(card.dataset.storyId)) cards.appendChild(card);
      }
      const nextLink = next.querySelector('a[data-role="more"]');
      if (nextLink) link.replaceWith(nextLink);
      else link.remove();
    },

    async reload(initial) {
      const position = await this.load(initial);
      startStream(position, (event) => this.onEvent(event));
    },

    setup() {
      this.root = document.getElementById("board");
      this.container = this.root.querySelector('[data-role="fragment"]');
      const params = new URLSearchParams(location.search);
      const text = document.getElementById("filter-text");
      const epic = document.getElementById("filter-epic");
      if (text) text.value = params.get("text") || "";
      if (epic && params.get("epic")) {
        const option = document.createElement("option");
        option.value = params.get("epic");
        option.textContent = params.get("epic");
        epic.appendChild(option);
        epic.value = params.get("epic");
      }
      const changed = () => {
        const f = this.filters();
        const next = new URLSearchParams();
        if (f.text) next.set("text", f.text);
        if (f.epic) next.set("epic", f.epic);
        const search = next.toString();
        history.replaceState(null, "", location.pathname + (search ? "?" + search : ""));
        this.load(false).catch(showError);
      };
      if (text) text.addEventListener("input", debounce(changed, 250));
      if (epic) epic.addEventListener("change", changed);
      const form = document.getElementById("filters");
      if (form) form.addEventListener("submit", (event) => { event.preventDefault(); changed(); });
      this.root.addEventListener("click", (event) => {
        const link = event.target.closest('a[data-role="more"]');
        if (!link) return;
        event.preventDefault();
        this.more(link).catch(showError);
      });
      setInterval(tickElapsed, 1000);
    },

    start() {
      return this.reload(true);
    },
  };

  function formatElapsed(seconds) {
    const total = Math.max(Math.floor(seconds), 0);
    const h = Math.floor(total / 3600);
    const m = Math.floor((total % 3600) / 60);
    const s = total % 60;
    if (h) return h + "h " + m + "m";
    if (m) return m + "m " + s + "s";
    return s + "s";
  }

  function tickElapsed() {
    for (const node of document.querySelectorAll('[data-field="agent"][data-since]')) {
      const since = Date.parse(node.dataset.since);
      if (Number.isNaN(since)) continue;
      node.textContent = node.dataset.roleName + " · " + formatElapsed((Date.now() - since) / 1000);
    }
  }

  // ------------------------------------------------------------------ story page

  const story = {
    root: null,
    container: null,
    id: null,
    asOf: null,
    logTimer: null,

    url(asOf) {
      return this.container.dataset.src + query({ as_of: asOf });
    },

    // A re-render (live events) keeps what the person was doing: the reason being typed,
    // the focused control, and a log scrolled to its end.
    async load(keep) {
      const nodes = await fragment(this.url(this.asOf));
      const reason = this.container.querySelector('input[name="reason"]');
      const typed = keep && reason ? reason.value : "";
      const active = document.activeElement;
      const focused = keep && active && this.container.contains(active) ? active.id : "";
      const log = document.getElementById("agent-log");
      const logAtEnd = !log || log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
      fill(this.container, nodes);
      const nextReason = this.container.querySelector('input[name="reason"]');
      if (nextReason && typed) nextReason.value = typed;
      if (focused) {
        const again = document.getElementById(focused);
        if (again) again.focus();
      }
      const nextLog = document.getElementById("agent-log");
      if (nextLog && logAtEnd) nextLog.scrollTop = nextLog.scrollHeight;
      const root = this.container.querySelector('[data-role="story-root"]');
      return root ? root.dataset.position : null;
    },

    // The slider: the state section only, so the slider keeps its place and focus.
    async travel(value) {
      const slider = document.getElementById("as-of");
      const live = slider && Number(value) >= Number(slider.max);
      this.asOf = live ? null : String(value);
      const nodes = await fragment(this.url(this.asOf));
      const next = nodes && nodes.querySelector("#story-state");
      const current = document.getElementById("story-state");
      if (next && current) current.replaceWith(next);
      const output = this.container.querySelector('[data-role="as-of-value"]');
      if (output) output.textContent = live ? "now" : String(value);
      for (const row of this.container.querySelectorAll("table#audit tr[data-position]")) {
        row.classList.toggle("after-as-of", !live && Number(row.dataset.position) > Number(value));
      }
    },

    async act(button) {
      const form = document.getElementById("actions");
      const input = form.querySelector('input[name="reason"]');
      const reason = input ? input.value.trim() : "";
      const eventName = button.dataset.event;
      if (button.dataset.needsReason === "true" && !reason) {
        message("error", "“" + button.textContent.replace(/\s*\*$/, "") + "” needs a reason");
        if (input) input.focus();
        return;
      }
      const body = { event: eventName, expected_version: Number(form.dataset.expectedVersion) };
      if (reason) body.reason = reason;
      for (const b of form.querySelectorAll("button[data-event]")) b.disabled = true;
      try {
        const response = await send("/stories/" + encodeURIComponent(this.id) + "/transitions", {
          method: "POST",
          headers: { "Content-Type": "application/json", Accept: "application/json" },
          body: JSON.stringify(body),
        });
        clearMessage("error");
        clearMessage("conflict");
        if (response.status === 409) {
          const err = await errorOf(response);
          if (err.code === "version_conflict" || err.code === "illegal_transition") {
            message("conflict", CONFLICT_TEXT);
          } else {
            message("error", err.message);
          }
        } else if (!response.ok) {
          throw await errorOf(response);
        }
        this.asOf = null;
        await this.load();
      } catch (err) {
        showError(err);
        for (const b of form.querySelectorAll("button[data-event]")) b.disabled = false;
      }
    },

    async showLog(role, attempt) {
      const url =
        "/ui/fragments/stories/" + encodeURIComponent(this.id) + "/log" +
        query({ role, attempt });
      const nodes = await fragment(url);
      const next = nodes && nodes.querySelector("#agent-log-box");
      const current = document.getElementById("agent-log-box");
      if (next && current) current.replaceWith(next);
    },

    // A running agent's log grows without events: re-read its tail while it runs.
    async pollLog() {
      const pre = document.getElementById("agent-log");
      if (!pre || pre.dataset.live !== "true") return;
      const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      try {
        await this.showLog(pre.dataset.logRole, pre.dataset.logAttempt);
      } catch (err) {
        showError(err);
        return;
      }
      const next = document.getElementById("agent-log");
      if (next && atEnd) next.scrollTop = next.scrollHeight;
    },

    onEvent(event) {
      // A project event may quarantine or clear a gate this story's section names.
      const mine = event.aggregate === "story" && event.story_id === this.id;
      if (!mine && event.aggregate !== "project") return;
      this.refreshSoon();
    },

    refreshSoon: throttle(() => {
      story.load(true).catch(showError);
    }, 150),

    setup() {
      this.root = document.getElementById("story");
      this.id = this.root.dataset.storyId;
      this.container = this.root.querySelector('[data-role="fragment"]');
      const asOf = new URLSearchParams(location.search).get("as_of");
      this.asOf = asOf || null;
      const travel = debounce((value) => this.travel(value).catch(showError), 120);
      this.root.addEventListener("input", (event) => {
        if (event.target.id === "as-of") travel(event.target.value);
      });
      this.root.addEventListener("change", (event) => {
        if (event.target.id === "as-of") travel(event.target.value);
      });
      this.root.addEventListener("click", (event) => {
        const button = event.target.closest("button[data-event]");
        if (button && this.root.contains(button)) {
          event.preventDefault();
          this.act(button);
          return;
        }
        const link = event.target.closest("a[data-log-role]");
        if (link) {
          event.preventDefault();
          this.showLog(link.dataset.logRole, link.dataset.logAttempt).catch(showError);
        }
      });
      this.root.addEventListener("submit", (event) => {
        if (event.target.id === "actions") event.preventDefault();
      });
      this.logTimer = setInterval(() => this.pollLog(), LOG_POLL_MS);
    },

    async start() {
      const position = await this.load();
      startStream(position, (event) => this.onEvent(event));
    },
  };

  // ------------------------------------------------------------------ other pages

  // A page that is one fragment, re-read (at most every `ms`) when a matching event comes,
  // and every `every` ms when given (for what changes without an event: heartbeats).
  function simplePage(mainSelector, matches, ms, every) {
    let container = null;
    const reload = async () => {
      fill(container, await fragment(container.dataset.src));
    };
    const soon = throttle(() => reload().catch(showError), ms);
    return {
      setup() {
        container = document.querySelector(mainSelector + ' [data-role="fragment"]');
      },
      async start() {
        // Listening first: an event committed while the fragment is read re-reads it.
        if (matches) startStream(null, (event) => { if (matches(event)) soon(); });
        else setLive("a snapshot: reload the page to update");
        if (every) setInterval(soon, every);
        await reload();
      },
    };
  }

  function epicPage() {
    const main = document.getElementById("epic");
    const id = main ? main.dataset.epicId : "";
    return simplePage(
      "main#epic",
      (event) => event.story_id === id || String(event.story_id).startsWith(id + "."),
      300,
    );
  }

  const PAGES = {
    board: () => board,
    story: () => story,
    "merge-queue": () =>
      simplePage("main#merge-queue-page", (e) => e.aggregate === "story" || e.aggregate === "project", 500),
    runs: () => simplePage("main#runs-page", (e) => e.aggregate === "story", 500),
    epics: () => simplePage("main#epics-page", () => true, 500),
    epic: epicPage,
    metrics: () => simplePage("main#metrics-page", null, 0),
    workers: () => simplePage("main#workers-page", (e) => e.aggregate === "story", 1000, 5000),
  };

  let page = null;

  function start() {
    if (!page) return;
    clearMessage("error");
    Promise.resolve(page.start()).catch(showError);
  }

  document.addEventListener("DOMContentLoaded", () => {
    setupTokenForm();
    const make = PAGES[document.body.dataset.page];
    if (!make) return;
    page = make();
    page.setup();
    start();
  });
})();
