// The dashboard's live parts, in plain JavaScript (no framework, no build step): server-sent events
// from the dashboard's own routes, which the sign-in cookie authorizes (EventSource sends it).
"use strict";

function show(row, state) {
  // Update a job's status badge and progress bar in place (a table row or the job page).
  const badge = row.querySelector("[data-role=status]");
  if (badge && badge.textContent !== state.status) {
    badge.textContent = state.status;
    badge.className = "badge " + state.status;
  }
  const progress = row.querySelector("[data-role=progress]");
  if (!progress) return;
  if (state.status === "queued" || state.status === "running") {
    let bar = progress.querySelector("progress");
    if (!bar) {
      bar = document.createElement("progress");
      bar.max = 1;
      const stage = document.createElement("span");
      stage.dataset.role = "stage";
      progress.replaceChildren(bar, document.createTextNode(" "), stage);
    }
    bar.value = state.fraction || 0;
    progress.querySelector("[data-role=stage]").textContent = state.stage || "";
  } else {
    progress.replaceChildren();
  }
}

function watchList(table) {
  // GET /ui/jobs/live: one stream for every unfinished job in the table.
  const ids = table.dataset.live;
  if (!ids) return;
  const source = new EventSource("/ui/jobs/live?ids=" + encodeURIComponent(ids));
  source.addEventListener("job", (e) => {
    const state = JSON.parse(e.data);
    const row = table.querySelector('tr[data-job="' + CSS.escape(state.job_id) + '"]');
    if (row) show(row, state);
  });
  source.addEventListener("end", () => source.close());
}

function watchJob(box) {
  // GET /ui/jobs/{id}/events: the job's own event stream; when it ends, the page is drawn again
  // with the report and the downloads.
  if (box.dataset.terminal === "yes") return;
  const source = new EventSource("/ui/jobs/" + encodeURIComponent(box.dataset.job) + "/events");
  const update = (e) => {
    const data = JSON.parse(e.data);
    show(box, { status: data.status, stage: data.progress.stage, fraction: data.progress.fraction });
  };
  source.addEventListener("status", update);
  source.addEventListener("progress", update);
  source.addEventListener("end", () => {
    source.close();
    window.location.reload();
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const table = document.getElementById("jobs");
  if (table) watchList(table);
  const job = document.getElementById("job");
  if (job) watchJob(job);
});
