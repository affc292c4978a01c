// Hobotnica's live job log. It shows the last part of the log that the
// page names (data-start, a line's start), follows the rest through the
// controller's server-sent events and loads earlier parts on demand.
//
// Safety: log bytes only ever reach the page as text (createTextNode);
// ANSI SGR colours become CSS classes; every other escape sequence,
// OSC 8 hyperlinks included, is dropped, never turned into markup.
// No byte is lost or shown twice: each event says where its bytes end,
// bytes before what is shown are skipped, and a gap reconnects from the
// last byte shown. While the page follows the end, it asks the controller
// to skip ahead when it falls far behind (a `skip` event: the lines it
// jumps over are left to "Load earlier", as those before the first line).
"use strict";

(function () {
  const view = document.getElementById("log");
  if (!view) return;

  const jobId = view.dataset.job;
  /** Bytes fetched at once by "Load earlier". */
  const EARLIER_BYTES = 256 * 1024;
  /** Lines kept while following; older ones leave the page ("Load earlier"). */
  const MAX_LINES = 20000;
  /** Lines per block: the browser lays out only the blocks in view. */
  const CHUNK_LINES = 500;
  /** Bytes drawn at once, and how long a frame may spend drawing. */
  const SLICE_BYTES = 16 * 1024;
  const FRAME_BUDGET_MS = 20;
  /** Reconnect delays after a broken event stream. */
  const RETRY_FIRST_MS = 250;
  const RETRY_MAX_MS = 4000;

  const earlierButton = document.getElementById("log-earlier");
  const followButton = document.getElementById("log-follow");
  const status = document.getElementById("log-status");

  let start = Number(view.dataset.start); // first byte shown
  let firstLine = Number(view.dataset.linesBefore) + 1; // its line number
  let offset = start; // the next byte the stream should bring
  let following = true;
  let ended = false;
  let retryMs = RETRY_FIRST_MS;
  let source = null;
  let catchingUp = false; // whether the stream may skip ahead
  let wantedLine = null;

  // ANSI: a state machine over decoded text, kept across pieces and lines.
  const FG = ["black", "red", "green", "yellow", "blue", "magenta", "cyan", "white"];

  function AnsiState() {
    this.mode = "text"; // text | esc | csi | osc | osc-esc
    this.params = "";
    this.fg = null;
    this.bg = null;
    this.bold = false;
    this.italic = false;
    this.underline = false;
  }

  AnsiState.prototype.classes = function () {
    const list = [];
    if (this.fg) list.push("fg-" + this.fg);
    if (this.bg) list.push("bg-" + this.bg);
    if (this.bold) list.push("sgr-bold");
    if (this.italic) list.push("sgr-italic");
    if (this.underline) list.push("sgr-underline");
    return list.join(" ");
  };

  AnsiState.prototype.sgr = function (raw) {
    const codes = raw === "" ? [0] : raw.split(";").map((p) => (p === "" ? 0 : Number(p)));
    for (let i = 0; i < codes.length; i++) {
      const code = codes[i];
      if (code === 0) {
        this.fg = this.bg = null;
        this.bold = this.italic = this.underline = false;
      } else if (code === 1) this.bold = true;
      else if (code === 3) this.italic = true;
      else if (code === 4) this.underline = true;
      else if (code === 22) this.bold = false;
      else if (code === 23) this.italic = false;
      else if (code === 24) this.underline = false;
      else if (code >= 30 && code <= 37) this.fg = FG[code - 30];
      else if (code === 39) this.fg = null;
      else if (code >= 40 && code <= 47) this.bg = FG[code - 40];
      else if (code === 49) this.bg = null;
      else if (code >= 90 && code <= 97) this.fg = "bright-" + FG[code - 90];
      else if (code >= 100 && code <= 107) this.bg = "bright-" + FG[code - 100];
      else if (code === 38 || code === 48) {
        // 256 colours: the first 16 map to classes; others and RGB are skipped.
        let colour = null;
        if (codes[i + 1] === 5) {
          const n = codes[i + 2];
          if (n < 8) colour = FG[n];
          else if (n < 16) colour = "bright-" + FG[n - 8];
          i += 2;
        } else if (codes[i + 1] === 2) {
          i += 4;
        }
        if (code === 38) this.fg = colour;
        else this.bg = colour;
      }
    }
  };

  // Appends `text` to `target` (a line's text element) as text nodes and
  // spans with classes; escape sequences change the state or are dropped.
  AnsiState.prototype.render = function (text, target) {
    let run = "";
    const flush = () => {
      if (run === "") return;
      if (!target) {
        run = "";
        return;
      }
      const classes = this.classes();
      if (classes === "") {
        target.appendChild(document.createTextNode(run));
      } else {
        const span = document.createElement("span");
        span.className = classes;
        span.appendChild(document.createTextNode(run));
        target.appendChild(span);
      }
      run = "";
    };
    for (let i = 0; i < text.length; i++) {
      const ch = text[i];
      const code = text.charCodeAt(i);
      switch (this.mode) {
        case "text":
          if (code === 0x1b) {
            flush();
            this.mode = "esc";
          } else if (code === 0x9b) {
            flush();
            this.mode = "csi";
            this.params = "";
          } else if (code === 0x09 || (code >= 0x20 && code !== 0x7f && !(code >= 0x80 && code < 0xa0))) {
            run += ch;
          } // other control characters are dropped
          break;
        case "esc":
          if (ch === "[") {
            this.mode = "csi";
            this.params = "";
          } else if (ch === "]" || ch === "P" || ch === "X" || ch === "^" || ch === "_") {
            this.mode = "osc"; // OSC, DCS, SOS, PM, APC: dropped to their end
          } else {
            this.mode = "text"; // a two-character sequence: dropped
          }
          break;
        case "csi":
          if (code >= 0x40 && code <= 0x7e) {
            if (ch === "m" && /^[0-9;]*$/.test(this.params)) this.sgr(this.params);
            this.mode = "text";
          } else if (code >= 0x20 && code <= 0x3f) {
            if (this.params.length < 64) this.params += ch;
          } else {
            this.mode = "text"; // malformed: dropped
          }
          break;
        case "osc":
          if (code === 0x07 || code === 0x9c) this.mode = "text";
          else if (code === 0x1b) this.mode = "osc-esc";
          break;
        case "osc-esc":
          this.mode = ch === "\\" ? "text" : "osc";
          break;
      }
    }
    flush();
  };

  // Lines: <div class="line" id="L12"><a class="ln" href="#L12">12</a><span class="tx">…</span></div>
  function makeLine(number, at) {
    const line = document.createElement("div");
    line.className = "line";
    line.id = "L" + number;
    line.hobotnicaOffset = at;
    const link = document.createElement("a");
    link.className = "ln";
    link.href = "#L" + number;
    link.textContent = String(number);
    const text = document.createElement("span");
    text.className = "tx";
    line.appendChild(link);
    line.appendChild(text);
    return line;
  }

  // Turns bytes into lines, appended to a container: the live stream's
  // renderer (into the view) and each earlier part's (into a fragment).
  function Renderer(container, number) {
    this.container = container; // where blocks of lines go
    this.block = null; // the block new lines go into
    this.lines = 0; // lines this renderer opened
    this.number = number; // the number of the next line to open
    this.open = null; // the text element of a line without its newline yet
    this.decoder = new TextDecoder("utf-8");
    this.ansi = new AnsiState();
  }

  // `bytes` start at log offset `at`.
  Renderer.prototype.append = function (bytes, at) {
    let i = 0;
    while (i < bytes.length) {
      if (!this.open) {
        const line = makeLine(this.number, at + i);
        if (!this.block || this.block.childElementCount >= CHUNK_LINES) {
          this.block = document.createElement("div");
          this.block.className = "block";
          this.container.appendChild(this.block);
        }
        this.block.appendChild(line);
        this.lines += 1;
        this.open = line.lastChild;
      }
      const newline = bytes.indexOf(10, i);
      const end = newline === -1 ? bytes.length : newline;
      // A newline byte is never inside a UTF-8 character: a line decodes alone.
      const text = this.decoder.decode(bytes.subarray(i, end), { stream: newline === -1 });
      this.ansi.render(text, this.open);
      if (newline === -1) break;
      this.open = null;
      this.number += 1;
      i = newline + 1;
    }
  };

  // Goes over the first `lines` lines of `bytes` without showing them,
  // keeping the colour state; returns how many bytes that took (all of
  // them when they hold fewer lines).
  Renderer.prototype.skip = function (bytes, lines) {
    let i = 0;
    let escape = bytes.indexOf(0x1b); // the next ESC at or after i (-1: none)
    while (i < bytes.length && lines > 0) {
      const newline = bytes.indexOf(10, i);
      const end = newline === -1 ? bytes.length : newline;
      if (escape !== -1 && escape < i) escape = bytes.indexOf(0x1b, i);
      if (this.ansi.mode !== "text" || (escape !== -1 && escape < end)) {
        this.ansi.render(this.decoder.decode(bytes.subarray(i, end), { stream: newline === -1 }), null);
      }
      if (newline === -1) return bytes.length;
      this.decoder = new TextDecoder("utf-8");
      this.number += 1;
      lines -= 1;
      i = newline + 1;
    }
    return i;
  };

  const live = new Renderer(view, firstLine);
  // The colours the job set before the first line shown (SGR parameters).
  if (view.dataset.colours) live.ansi.sgr(view.dataset.colours);

  function atBottom() {
    return view.scrollHeight - view.scrollTop - view.clientHeight < 8;
  }

  function scrollToEnd() {
    view.scrollTop = view.scrollHeight;
  }

  function setFollowing(value) {
    following = value;
    followButton.hidden = value || ended;
    if (value) scrollToEnd();
    // Back at the end: let the stream skip what the reader will not see.
    if (value && !catchingUp && !ended && source) {
      source.close();
      connect();
    }
  }

  view.addEventListener("scroll", () => {
    const bottom = atBottom();
    if (bottom !== following) setFollowing(bottom);
  });
  followButton.addEventListener("click", () => setFollowing(true));

  // Keeps the page light while a long log streams: drops the oldest lines
  // in one step, keeping what a reader looks at in place.
  function trim() {
    let removed = false;
    const before = view.scrollHeight;
    while (view.firstElementChild && view.firstElementChild !== live.block &&
           shownLines() - view.firstElementChild.childElementCount >= MAX_LINES) {
      view.removeChild(view.firstElementChild);
      removed = true;
    }
    if (!removed) return;
    if (!following) view.scrollTop -= before - view.scrollHeight;
    const first = view.firstElementChild.firstElementChild;
    start = first.hobotnicaOffset;
    firstLine = Number(first.id.slice(1));
    earlierButton.hidden = start === 0;
  }

  function shownLines() {
    let lines = 0;
    for (const block of view.children) lines += block.childElementCount;
    return lines;
  }

  function showWanted() {
    if (wantedLine === null) return;
    const line = document.getElementById("L" + wantedLine);
    if (!line) return;
    for (const old of view.querySelectorAll(".line.hl")) old.classList.remove("hl");
    line.classList.add("hl");
    following = false;
    followButton.hidden = ended;
    line.scrollIntoView({ block: "center" });
    wantedLine = null;
  }

  function onHash() {
    const match = /^#L([0-9]+)$/.exec(location.hash);
    wantedLine = match ? Number(match[1]) : null;
    if (wantedLine !== null && wantedLine < firstLine && start > 0) {
      loadEarlier().then(showWanted);
    } else {
      showWanted();
    }
  }
  window.addEventListener("hashchange", onHash);

  function base64Bytes(data) {
    const binary = atob(data);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return bytes;
  }

  // Pieces wait here for the next frame, so that a fast log is rendered in
  // batches and the page stays responsive (`render` draws for at most
  // FRAME_BUDGET_MS a frame).
  let pending = [];
  let frame = null;

  function onLog(event) {
    const bytes = base64Bytes(event.data);
    const end = Number(event.lastEventId);
    const at = end - bytes.length;
    if (end <= offset) return; // already shown
    if (at > offset) {
      // A gap (never expected): ask again from the last byte shown.
      reconnect();
      return;
    }
    pending.push({ bytes: bytes.subarray(offset - at), at: offset });
    offset = end;
    retryMs = RETRY_FIRST_MS;
    status.textContent = "";
    if (frame === null) frame = requestAnimationFrame(() => render(false));
  }

  // The controller jumped from `from` to `to` (a line's start) over
  // `lines` line ends that changed the colours by `colours`.
  function onSkip(event) {
    let skip = null;
    try {
      skip = JSON.parse(event.data);
    } catch (err) {
      skip = null;
    }
    if (!skip || skip.from !== offset || !(skip.to > offset)) {
      reconnect();
      return;
    }
    if (!following) {
      // The reader looks at what is shown: go on with every byte instead.
      source.close();
      catchingUp = false;
      connect();
      return;
    }
    // What waits to be drawn is gone with the rest; its lines still count.
    if (frame !== null) {
      cancelAnimationFrame(frame);
      frame = null;
    }
    for (const part of pending) live.skip(part.bytes, Infinity);
    pending = [];
    view.textContent = "";
    live.open = null;
    live.block = null;
    live.decoder = new TextDecoder("utf-8");
    live.ansi.mode = "text";
    if (skip.colours) live.ansi.sgr(skip.colours);
    live.number += skip.lines;
    start = offset = skip.to;
    firstLine = live.number;
    earlierButton.hidden = false;
    retryMs = RETRY_FIRST_MS;
  }

  function countLines(bytes) {
    let lines = 0;
    for (let i = bytes.indexOf(10); i !== -1; i = bytes.indexOf(10, i + 1)) lines += 1;
    return lines;
  }

  // Draws what waits, oldest first, in slices, for at most one frame's
  // budget (all of it when `everything`); the rest waits for the next frame.
  function render(everything) {
    frame = null;
    const began = performance.now();
    // Lines that would be dropped at once are not shown at all: with more
    // than MAX_LINES new lines, what is shown now goes, and so do the
    // oldest of the new ones.
    let excess = pending.reduce((sum, part) => sum + countLines(part.bytes), 0) - MAX_LINES;
    while (excess > 0 && pending.length > 0) {
      const part = pending[0];
      if (live.open || view.firstElementChild) {
        view.textContent = "";
        live.open = null;
        live.block = null;
      }
      const used = live.skip(part.bytes, excess);
      excess -= countLines(part.bytes.subarray(0, used));
      part.bytes = part.bytes.subarray(used);
      part.at += used;
      start = part.at;
      firstLine = live.number;
      earlierButton.hidden = start === 0;
      if (part.bytes.length === 0) pending.shift();
    }
    while (pending.length > 0 && (everything || performance.now() - began < FRAME_BUDGET_MS)) {
      const part = pending[0];
      const slice = part.bytes.subarray(0, SLICE_BYTES);
      live.append(slice, part.at);
      part.bytes = part.bytes.subarray(slice.length);
      part.at += slice.length;
      if (part.bytes.length === 0) pending.shift();
    }
    trim();
    if (following) scrollToEnd();
    showWanted();
    if (pending.length > 0) frame = requestAnimationFrame(() => render(false));
  }

  function setField(id, text, iso) {
    const field = document.getElementById(id);
    if (!field || text === "") return;
    field.textContent = "";
    if (iso) {
      const time = document.createElement("time");
      time.setAttribute("datetime", iso);
      const when = new Date(iso);
      time.textContent = Number.isNaN(when.getTime())
        ? text
        : when.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
      time.title = text;
      field.appendChild(time);
    } else {
      field.textContent = text;
    }
  }

  function onEnd(event) {
    if (frame !== null) {
      cancelAnimationFrame(frame);
      render(true);
    }
    ended = true;
    source.close();
    followButton.hidden = true;
    let facts = {};
    try {
      facts = JSON.parse(event.data);
    } catch (err) {
      facts = {};
    }
    const state = document.getElementById("job-state");
    if (state && facts.state) {
      state.textContent = facts.state;
      state.className = "state state-" + facts.state;
    }
    setField("job-agent", facts.agent || "");
    setField("job-started", facts.started || "", facts.started_iso);
    setField("job-finished", facts.finished || "", facts.finished_iso);
    setField("job-duration", facts.duration || "");
    setField("job-exit", facts.exit_code || "");
    const message = document.getElementById("job-message");
    if (message && facts.message) {
      message.textContent = facts.message;
      message.hidden = false;
    }
    const cancel = document.getElementById("cancel-form");
    const retry = document.getElementById("retry-form");
    if (cancel) cancel.hidden = true;
    if (retry) retry.hidden = false;
    view.dataset.state = facts.state || "";
    status.textContent = "The job ended: " + (facts.state || "finished") + ".";
  }

  function connect() {
    catchingUp = following;
    source = new EventSource(
      "/jobs/" + jobId + "/log/events?from=" + offset + (catchingUp ? "&catch_up=true" : ""),
    );
    source.addEventListener("log", onLog);
    source.addEventListener("skip", onSkip);
    source.addEventListener("end", onEnd);
    // The page resumes by itself (from the last byte shown), also where the
    // browser would give up (an error answer while the controller restarts).
    source.addEventListener("error", () => {
      if (ended) return;
      reconnect();
    });
  }

  let reconnecting = null;
  function reconnect() {
    if (source) source.close();
    if (reconnecting !== null) return;
    status.textContent = "Connection lost; reconnecting…";
    reconnecting = setTimeout(() => {
      reconnecting = null;
      connect();
    }, retryMs);
    retryMs = Math.min(retryMs * 2, RETRY_MAX_MS);
  }

  // "Load earlier": the bytes before the first line shown, from a line's
  // start (a longer range when a line is longer than one part).
  let loading = null;
  function loadEarlier() {
    if (loading) return loading;
    loading = (async () => {
      earlierButton.disabled = true;
      try {
        let size = EARLIER_BYTES;
        for (;;) {
          const from = Math.max(0, start - size);
          const answer = await fetch("/jobs/" + jobId + "/log/raw?offset=" + from + "&end=" + start, {
            credentials: "same-origin",
          });
          if (!answer.ok) throw new Error("HTTP " + answer.status);
          const bytes = new Uint8Array(await answer.arrayBuffer());
          let skip = 0;
          if (from > 0) {
            const newline = bytes.indexOf(10);
            if (newline === -1 || newline === bytes.length - 1) {
              size *= 2; // one line longer than the range: look further back
              continue;
            }
            skip = newline + 1;
          }
          const part = bytes.subarray(skip);
          let lines = 0;
          for (let i = 0; i < part.length; i++) if (part[i] === 10) lines += 1;
          const fragment = document.createDocumentFragment();
          new Renderer(fragment, firstLine - lines).append(part, from + skip);
          const before = view.scrollHeight;
          view.insertBefore(fragment, view.firstChild);
          if (!following) view.scrollTop += view.scrollHeight - before;
          start = from + skip;
          firstLine -= lines;
          earlierButton.hidden = start === 0;
          return;
        }
      } catch (err) {
        status.textContent = "Could not load the earlier part: " + err.message;
      } finally {
        earlierButton.disabled = false;
        loading = null;
      }
    })();
    return loading;
  }
  earlierButton.addEventListener("click", () => {
    following = false;
    loadEarlier();
  });

  connect();
  if (location.hash) onHash();
})();
