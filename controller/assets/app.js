// Hobotnica's dashboard: small progressive enhancements; every page works
// without this file.
"use strict";

// Times are rendered in UTC by the server; show them in the reader's own
// time zone, keeping the exact time in the title.
function localTimes() {
  for (const time of document.querySelectorAll("time[datetime]")) {
    const when = new Date(time.getAttribute("datetime"));
    if (Number.isNaN(when.getTime())) continue;
    time.title = time.textContent;
    time.textContent = when.toLocaleString(undefined, {
      dateStyle: "medium",
      timeStyle: "short",
    });
  }
}

document.addEventListener("DOMContentLoaded", localTimes);
