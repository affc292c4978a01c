// Hobotnica's jobs list, kept current: the controller's /jobs/events sends
// each job (that the viewer may read and the filters match) when it is
// queued, starts, is asked to cancel or ends. A row is built with
// textContent only.
"use strict";

(function () {
  const table = document.getElementById("jobs");
  if (!table || !window.EventSource) return;
  const body = table.tBodies[0];
  const empty = document.getElementById("jobs-empty");
  const stateFilter = table.dataset.state;
  const firstPage = table.dataset.firstPage === "true";

  function cell(row, tag, build) {
    const element = document.createElement(tag);
    if (tag === "th") element.scope = "row";
    build(element);
    row.appendChild(element);
  }

  function text(parent, tag, value, className) {
    const element = document.createElement(tag);
    element.textContent = value;
    if (className) element.className = className;
    parent.appendChild(element);
    return element;
  }

  function rowOf(job) {
    const row = document.createElement("tr");
    row.dataset.id = String(job.id);
    cell(row, "th", (th) => {
      const link = text(th, "a", "#" + job.id);
      link.href = "/jobs/" + job.id;
    });
    cell(row, "td", (td) => text(td, "span", job.state, "state state-" + job.state));
    cell(row, "td", (td) => (td.textContent = job.repo));
    cell(row, "td", (td) => {
      text(td, "code", job.target);
      td.appendChild(document.createTextNode(" "));
      text(td, "span", "(" + job.kind + ")", "muted");
    });
    cell(row, "td", (td) => {
      text(td, "code", job.commit);
      if (job.branch) {
        td.appendChild(document.createTextNode(" "));
        text(td, "span", job.branch, "muted");
      }
    });
    cell(row, "td", (td) => (td.textContent = job.who));
    cell(row, "td", (td) => {
      const time = text(td, "time", job.created);
      time.setAttribute("datetime", job.created_iso);
      const when = new Date(job.created_iso);
      if (!Number.isNaN(when.getTime())) {
        time.title = job.created;
        time.textContent = when.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
      }
    });
    return row;
  }

  function onJob(event) {
    let job;
    try {
      job = JSON.parse(event.data);
    } catch (err) {
      return;
    }
    const old = body.querySelector('tr[data-id="' + Number(job.id) + '"]');
    const matches = !stateFilter || job.state === stateFilter;
    if (old) {
      if (matches) body.replaceChild(rowOf(job), old);
      else old.remove();
    } else if (matches && firstPage) {
      // Newest first: before the first row with a smaller id.
      const next = [...body.rows].find((row) => Number(row.dataset.id) < job.id);
      body.insertBefore(rowOf(job), next || null);
    }
    empty.hidden = body.rows.length > 0;
  }

  let source = null;
  let retryMs = 250;
  function connect() {
    source = new EventSource(table.dataset.events);
    source.addEventListener("open", () => (retryMs = 250));
    source.addEventListener("job", onJob);
    source.addEventListener("resync", () => location.reload());
    source.addEventListener("error", () => {
      source.close();
      setTimeout(connect, retryMs);
      retryMs = Math.min(retryMs * 2, 4000);
    });
  }
  connect();
})();
