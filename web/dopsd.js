// comfyui-dopsd front-end extension: live D-OPSD training jobs in the ComfyUI frontend.
//
// - On every "D-OPSD Trainer" node: a card with the job state, a progress bar (step / total / it/s / ETA),
//   a loss chart, the latest student and teacher previews, the job's error, and Pause / Resume / Stop buttons.
// - A "D-OPSD" sidebar tab listing every job the server knows.
// State comes from the pack's routes (GET /dopsd/jobs on start-up, so it survives a page reload) and is kept
// live by the websocket events dopsd.progress / dopsd.state / dopsd.preview (contract: docs/architecture.md).
// Redraws are batched into one requestAnimationFrame, so a fast stream of events never blocks the canvas.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { drawLossChart, formatDuration, formatLoss } from "./dopsd_chart.js";

const TRAINER = "DOPSDTrainer";
const ACTIVE = new Set(["waiting", "running", "paused", "stopping"]);
const FINAL = new Set(["finished", "stopped", "error"]);
const MAX_POINTS = 1000; // client-side cap; the server already downsamples its list to <= 500
const POLL_MS = 5000;    // while a job is active: re-read the routes (covers missed websocket messages)
const CARD_HEIGHT = 372;

// ---------------------------------------------------------------------------------------------------------
// Job store: job_id -> JobStatus (docs/architecture.md), in creation order.
const jobs = new Map();
// A trainer node remembers the job it started in its properties (saved with the workflow), so the card shows that
// job, and not another workflow's job from a node with the same id, after a reload or when the workflow is reopened.
const JOB_PROPERTY = "dopsd_job_id";
const stats = { progress: 0, state: 0, preview: 0, fetches: 0, renders: 0, chartDraws: 0 };
let lastRefreshError = null;
const toasted = new Map(); // job_id -> how many of its warnings were shown as toasts

function emptyStatus(jobId, nodeId) {
  return {
    job_id: jobId, node_id: nodeId ?? "", prompt_id: "", method: "", state: "waiting", step: 0, total_steps: 0,
    loss: null, its_per_sec: 0, eta_s: null, losses: [], error: null, warnings: [], checkpoints: [], lora_path: null,
    previews: null,
  };
}

function capLosses(losses) {
  if (losses.length <= MAX_POINTS) return losses;
  const keep = [];
  for (let i = 0; i < losses.length - 1; i += 2) keep.push(losses[i]);
  keep.push(losses[losses.length - 1]);
  return keep;
}

function putStatus(status) {
  if (!status || !status.job_id) return;
  const prev = jobs.get(status.job_id);
  const next = { ...emptyStatus(status.job_id), ...status, losses: Array.isArray(status.losses) ? status.losses.slice() : [] };
  // A GET answered just before a newer progress event must not take the chart back in time.
  if (prev && !FINAL.has(next.state) && next.state === prev.state && next.step < prev.step) {
    next.step = prev.step;
    next.loss = prev.loss;
    next.losses = prev.losses;
    next.its_per_sec = prev.its_per_sec;
    next.eta_s = prev.eta_s;
  }
  jobs.set(status.job_id, next);
  return next;
}

async function fetchJson(path, options) {
  stats.fetches++;
  const res = await api.fetchApi(path, options);
  let body = null;
  try {
    body = await res.json();
  } catch {
    body = null;
  }
  if (!res.ok) {
    const msg = (body && body.error) || `${res.status} ${res.statusText}`;
    throw new Error(msg);
  }
  return body;
}

async function refreshAll() {
  try {
    const body = await fetchJson("/dopsd/jobs");
    const seen = new Set();
    for (const status of body.jobs || []) {
      putStatus(status);
      seen.add(status.job_id);
    }
    for (const id of [...jobs.keys()]) if (!seen.has(id)) jobs.delete(id); // e.g. the server restarted
    lastRefreshError = null;
  } catch (e) {
    lastRefreshError = String(e.message || e);
    console.warn("[dopsd] could not read /dopsd/jobs:", e);
  }
  scheduleRender();
}

async function refreshJob(jobId) {
  try {
    putStatus(await fetchJson(`/dopsd/jobs/${encodeURIComponent(jobId)}`));
  } catch (e) {
    console.warn(`[dopsd] could not read job ${jobId}:`, e);
  }
  scheduleRender();
}

function onProgress(d) {
  if (!d || !d.job_id) return;
  stats.progress++;
  let job = jobs.get(d.job_id);
  if (!job) {
    job = emptyStatus(d.job_id, d.node_id);
    jobs.set(d.job_id, job);
    refreshJob(d.job_id); // fills in what a progress message does not carry
  }
  for (const key of ["step", "total_steps", "loss", "its_per_sec", "eta_s", "state"]) {
    if (d[key] !== undefined) job[key] = d[key];
  }
  if (d.node_id !== undefined) job.node_id = d.node_id;
  const last = job.losses[job.losses.length - 1];
  if (d.loss != null && isFinite(d.loss) && (!last || d.step > last[0])) {
    job.losses.push([d.step, d.loss]);
    job.losses = capLosses(job.losses);
  }
  scheduleRender();
}

function notify(severity, summary, detail) {
  try {
    app.extensionManager?.toast?.add?.({ severity, summary, detail, life: severity === "success" ? 6000 : 15000 });
  } catch {
    /* the toast is a nicety; the card shows the same thing */
  }
}

function onState(status) {
  if (!status || !status.job_id) return;
  stats.state++;
  const previous = jobs.get(status.job_id);
  const before = previous?.state;
  // each warning toasts once: a count per job that a stale GET answer (fewer warnings) cannot take back
  const warned = toasted.get(status.job_id) ?? previous?.warnings?.length ?? 0;
  const job = putStatus(status);
  for (const warning of (job.warnings || []).slice(warned)) notify("warn", "D-OPSD training", warning);
  toasted.set(job.job_id, Math.max(warned, (job.warnings || []).length));
  if (job.state !== before) {
    if (job.state === "error") notify("error", "D-OPSD training failed", job.error || "unknown error");
    else if (job.state === "finished") notify("success", "D-OPSD training finished", job.lora_path || `job ${job.job_id}`);
  }
  scheduleRender();
}

function onPreview(d) {
  if (!d || !d.job_id) return;
  stats.preview++;
  let job = jobs.get(d.job_id);
  if (!job) {
    job = emptyStatus(d.job_id, d.node_id);
    jobs.set(d.job_id, job);
    refreshJob(d.job_id);
  }
  job.previews = { step: d.step, student: d.student ?? null, teacher: d.teacher ?? null };
  scheduleRender();
}

function jobIdOfNode(node) {
  return node?.properties?.[JOB_PROPERTY] || null;
}

function jobForNode(node) {
  const id = jobIdOfNode(node);
  return id ? jobs.get(id) ?? null : null;
}

/** The "executed" message of a trainer node carries the job it started: remember it on that node. */
function bindJob(nodeId, jobId) {
  const node = app.graph?.getNodeById?.(nodeId);
  if (!node || node.comfyClass !== TRAINER) return;
  node.properties = node.properties || {};
  if (node.properties[JOB_PROPERTY] === jobId) return;
  node.properties[JOB_PROPERTY] = jobId;
  try {
    app.extensionManager?.workflow?.activeWorkflow?.changeTracker?.checkState?.(); // persist it like any edit
  } catch {
    /* older frontends: saved with the next change */
  }
}

async function control(jobId, action) {
  const options = { method: "POST" };
  if (action === "stop") {
    options.headers = { "Content-Type": "application/json" };
    options.body = JSON.stringify({ save: true });
  }
  const status = await fetchJson(`/dopsd/jobs/${encodeURIComponent(jobId)}/${action}`, options);
  putStatus(status);
  scheduleRender();
  return status;
}

// ---------------------------------------------------------------------------------------------------------
// Rendering: views registered here are refreshed together on the next animation frame.
const views = new Set();
let frameRequested = false;

function scheduleRender() {
  if (frameRequested) return;
  frameRequested = true;
  requestAnimationFrame(() => {
    frameRequested = false;
    stats.renders++;
    for (const view of views) {
      try {
        view.render();
      } catch (e) {
        console.error("[dopsd] render failed:", e);
      }
    }
  });
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text != null) node.textContent = text;
  return node;
}

function imageUrl(ref) {
  if (!ref || !ref.filename) return "";
  const q = new URLSearchParams({ filename: ref.filename, subfolder: ref.subfolder ?? "", type: ref.type ?? "temp" });
  return api.apiURL(`/view?${q}`);
}

/** One job's card: used on trainer nodes and in the sidebar panel. */
class JobCard {
  constructor({ nodeId = null } = {}) {
    this.nodeId = nodeId;
    this.jobId = null;
    this.missingJobId = null;
    this.lastChartKey = null;
    this.drawnPoints = 0;
    this.busy = false;

    const root = (this.root = el("div", "dopsd-card"));
    root.dataset.state = "idle";
    const head = el("div", "dopsd-head");
    this.stateEl = el("span", "dopsd-state", "idle");
    this.titleEl = el("span", "dopsd-title", "");
    head.append(this.stateEl, this.titleEl);

    const bar = el("div", "dopsd-bar");
    this.fillEl = el("div", "dopsd-bar-fill");
    this.barText = el("div", "dopsd-bar-text", "");
    bar.append(this.fillEl, this.barText);

    this.statsEl = el("div", "dopsd-stats", "");
    this.canvas = el("canvas", "dopsd-chart");
    this.canvas.setAttribute("aria-label", "loss chart");

    this.previewsEl = el("div", "dopsd-previews");
    this.previewsEl.hidden = true;
    this.images = {};
    for (const role of ["student", "teacher"]) {
      const fig = el("figure", `dopsd-preview dopsd-preview-${role}`);
      const img = el("img");
      img.alt = `${role} preview`;
      img.loading = "lazy";
      const cap = el("figcaption", null, role);
      fig.append(img, cap);
      this.images[role] = { img, cap };
      this.previewsEl.append(fig);
    }

    this.errorEl = el("div", "dopsd-error");
    this.errorEl.hidden = true;
    this.warningEl = el("div", "dopsd-warning");
    this.warningEl.hidden = true;
    this.infoEl = el("div", "dopsd-info");
    this.infoEl.hidden = true;
    this.msgEl = el("div", "dopsd-msg");
    this.msgEl.hidden = true;

    const buttons = el("div", "dopsd-buttons");
    this.buttons = {};
    for (const [action, label, title] of [
      ["pause", "Pause", "Pause training after the current step"],
      ["resume", "Resume", "Continue a paused job"],
      ["stop", "Stop", "Stop training and save the LoRA as it is now"],
    ]) {
      const b = el("button", `dopsd-btn dopsd-btn-${action}`, label);
      b.type = "button";
      b.title = title;
      b.disabled = true;
      b.addEventListener("click", (ev) => {
        ev.stopPropagation();
        this.act(action);
      });
      this.buttons[action] = b;
      buttons.append(b);
    }
    root.append(head, bar, this.statsEl, this.canvas, this.previewsEl, this.errorEl, this.warningEl, this.infoEl, this.msgEl, buttons);
    // Keep pointer gestures on the card from starting canvas drags.
    root.addEventListener("pointerdown", (ev) => ev.stopPropagation());
    // Redraw the chart when the card becomes visible or changes size.
    if (typeof ResizeObserver !== "undefined") {
      new ResizeObserver(() => {
        this.lastChartKey = null;
        scheduleRender();
      }).observe(this.canvas);
    }
  }

  async act(action) {
    if (!this.jobId || this.busy) return;
    this.busy = true;
    this.msgEl.hidden = true;
    for (const b of Object.values(this.buttons)) b.disabled = true;
    try {
      await control(this.jobId, action);
    } catch (e) {
      this.msgEl.textContent = `${action} failed: ${e.message || e}`;
      this.msgEl.hidden = false;
    } finally {
      this.busy = false;
      scheduleRender();
    }
  }

  update(job) {
    const state = job ? job.state : "idle";
    this.jobId = job ? job.job_id : null;
    this.root.dataset.state = state;
    this.root.dataset.jobId = this.jobId ?? "";
    this.stateEl.dataset.state = state;
    this.stateEl.textContent = state;

    if (!job) {
      const gone = this.missingJobId ? `job ${this.missingJobId} is not on this server (restarted?)` : null;
      this.titleEl.textContent = this.nodeId != null ? gone || "no job yet: queue the prompt to train" : "";
      this.fillEl.style.width = "0%";
      this.barText.textContent = "";
      this.statsEl.textContent = "";
      this.previewsEl.hidden = true;
      this.errorEl.hidden = true;
      this.warningEl.hidden = true;
      this.infoEl.hidden = true;
    } else {
      const method = job.method ? job.method.replace("_", "-") : "job";
      const recipe = job.recipe?.recipe && job.recipe.recipe !== "custom" ? ` · ${job.recipe.recipe}` : "";
      this.titleEl.textContent = `${method}${recipe} · ${job.job_id}${this.nodeId == null && job.node_id !== "" ? ` · node #${job.node_id}` : ""}`;
      // hover: every setting the job trains with (an official recipe's values, or the inputs as given)
      const settings = Object.entries(job.recipe?.recipe_settings || {}).map(([k, v]) => `${k} = ${v}`);
      this.titleEl.title = [this.titleEl.textContent, ...settings].join("\n");
      const total = job.total_steps || 0;
      const pct = total ? Math.min(100, (100 * job.step) / total) : 0;
      this.fillEl.style.width = `${pct.toFixed(1)}%`;
      this.barText.textContent = total ? `step ${job.step} / ${total} (${pct.toFixed(0)}%)` : `step ${job.step}`;
      const parts = [];
      parts.push(`loss <b>${formatLoss(job.loss)}</b>`);
      parts.push(`<b>${job.its_per_sec ? job.its_per_sec.toFixed(2) : "–"}</b> it/s`);
      parts.push(`ETA <b>${ACTIVE.has(job.state) ? formatDuration(job.eta_s) : "–"}</b>`);
      this.statsEl.innerHTML = parts.join(" · ");

      const pv = job.previews;
      if (pv && (pv.student || pv.teacher)) {
        this.previewsEl.hidden = false;
        for (const role of ["student", "teacher"]) {
          const url = imageUrl(pv[role]);
          const { img, cap } = this.images[role];
          if (img.dataset.src !== url) {
            img.dataset.src = url;
            if (url) img.src = url;
            else img.removeAttribute("src");
          }
          cap.textContent = `${role} · step ${pv.step}`;
        }
      } else {
        this.previewsEl.hidden = true;
      }

      if (job.error) {
        this.errorEl.textContent = `Error: ${job.error}`;
        this.errorEl.hidden = false;
      } else {
        this.errorEl.hidden = true;
      }
      const warnings = job.warnings || [];
      this.warningEl.textContent = warnings.map((w) => `Warning: ${w}`).join("\n");
      this.warningEl.hidden = warnings.length === 0;
      const saved = job.lora_path || (job.checkpoints && job.checkpoints[job.checkpoints.length - 1]);
      if (saved) {
        this.infoEl.textContent = `saved: ${saved}`;
        this.infoEl.title = saved;
        this.infoEl.hidden = false;
      } else {
        this.infoEl.hidden = true;
      }
    }

    if (!this.busy) {
      this.buttons.pause.disabled = !(job && (state === "running" || state === "waiting"));
      this.buttons.resume.disabled = !(job && state === "paused");
      this.buttons.stop.disabled = !(job && (state === "running" || state === "waiting" || state === "paused"));
    }

    const losses = job ? job.losses : [];
    const last = losses[losses.length - 1];
    const key = `${this.jobId}|${losses.length}|${last ? last[0] : ""}|${job ? job.total_steps : 0}`;
    if (key !== this.lastChartKey) {
      const drawn = drawLossChart(this.canvas, losses, job ? job.total_steps : 0);
      if (this.canvas.clientWidth) this.lastChartKey = key; // hidden canvases are redrawn when shown
      this.drawnPoints = drawn;
      stats.chartDraws++;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Trainer node widget.
const nodeCards = new Map(); // LGraphNode -> JobCard

function attachToTrainer(node) {
  if (nodeCards.has(node)) return;
  const card = new JobCard({ nodeId: node.id });
  card.root.classList.add("dopsd-node-card");
  const widget = node.addDOMWidget("dopsd_status", "dopsd_status", card.root, {
    serialize: false, // never part of widgets_values or the prompt
    hideOnZoom: true,
    getValue: () => "",
    setValue: () => {},
    getMinHeight: () => CARD_HEIGHT,
    getMaxHeight: () => CARD_HEIGHT,
  });
  widget.serialize = false;
  nodeCards.set(node, card);
  let added = false;
  const view = {
    render() {
      if (!node.graph) {
        if (added) { // removed from its graph (onRemoved normally handles this)
          views.delete(view);
          nodeCards.delete(node);
        }
        return; // not added yet (or a preview node that never is)
      }
      added = true;
      card.nodeId = node.id;
      card.root.dataset.nodeId = String(node.id);
      card.missingJobId = jobIdOfNode(node);
      card.update(jobForNode(node));
    },
  };
  views.add(view);
  const onRemoved = node.onRemoved;
  node.onRemoved = function () {
    views.delete(view);
    nodeCards.delete(node);
    return onRemoved?.apply(this, arguments);
  };
  if (node.size[0] < 380) node.size[0] = 380;
  scheduleRender();
}

// ---------------------------------------------------------------------------------------------------------
// Sidebar panel: every job, newest first.
class JobsPanel {
  constructor() {
    this.root = el("div", "dopsd-panel");
    const head = el("div", "dopsd-panel-head");
    head.append(el("h3", null, "D-OPSD training jobs"));
    const refresh = el("button", "dopsd-panel-refresh", "Refresh");
    refresh.type = "button";
    refresh.title = "Read the job list from the server again";
    refresh.addEventListener("click", () => refreshAll());
    head.append(refresh);
    this.emptyEl = el("div", "dopsd-panel-empty",
      "No training jobs on this server yet. Queue a workflow with a D-OPSD Trainer node; its progress, loss and " +
      "previews appear here and on the node.");
    this.listEl = el("div", "dopsd-panel-list");
    this.root.append(head, this.emptyEl, this.listEl);
    this.cards = new Map(); // job id -> JobCard
  }

  render() {
    if (!this.root.isConnected) return;
    const ordered = [...jobs.values()].reverse();
    this.emptyEl.hidden = ordered.length > 0;
    if (lastRefreshError && !ordered.length) this.emptyEl.textContent = `Could not read the jobs: ${lastRefreshError}`;
    for (const [id, card] of this.cards) {
      if (!jobs.has(id)) {
        card.root.remove();
        this.cards.delete(id);
      }
    }
    let prev = null;
    for (const job of ordered) {
      let card = this.cards.get(job.job_id);
      if (!card) {
        card = new JobCard();
        card.root.classList.add("dopsd-panel-card");
        this.cards.set(job.job_id, card);
      }
      const want = prev ? prev.nextSibling : this.listEl.firstChild;
      if (want !== card.root) this.listEl.insertBefore(card.root, want);
      card.update(job);
      prev = card.root;
    }
  }
}

const panel = new JobsPanel();
views.add(panel);

function registerSidebar() {
  const tab = {
    id: "dopsd-jobs",
    icon: "pi pi-chart-line",
    title: "D-OPSD",
    tooltip: "D-OPSD training jobs",
    type: "custom",
    render: (container) => {
      container.appendChild(panel.root);
      scheduleRender();
    },
  };
  const manager = app.extensionManager;
  if (manager?.sidebarTab?.registerSidebarTab) manager.sidebarTab.registerSidebarTab(tab);
  else if (manager?.registerSidebarTab) manager.registerSidebarTab(tab);
}

// ---------------------------------------------------------------------------------------------------------
// Read-only state for people debugging in the console and for the browser tests.
function cardState(card) {
  const style = card.root.isConnected ? getComputedStyle(card.root) : null;
  return {
    jobId: card.jobId,
    state: card.root.dataset.state,
    progressText: card.barText.textContent,
    progressWidth: card.fillEl.style.width,
    stats: card.statsEl.textContent,
    chartPoints: card.drawnPoints,
    error: card.errorEl.hidden ? null : card.errorEl.textContent,
    warning: card.warningEl.hidden ? null : card.warningEl.textContent,
    previews: card.previewsEl.hidden ? null : Object.fromEntries(
      Object.entries(card.images).map(([role, { img }]) => [role, { src: img.dataset.src, loaded: img.complete && img.naturalWidth > 0 }])),
    buttons: Object.fromEntries(Object.entries(card.buttons).map(([a, b]) => [a, !b.disabled])),
    visible: !!style && style.display !== "none" && card.root.offsetParent !== null,
  };
}

const clone = (x) => (x == null ? x : JSON.parse(JSON.stringify(x)));

window.__dopsd = Object.freeze({
  version: 1,
  jobs: () => clone([...jobs.values()]),
  job: (id) => clone(jobs.get(id) ?? null),
  jobForNode: (nodeId) => clone(jobForNode(app.graph?.getNodeById?.(nodeId))),
  chartPoints: (id) => (jobs.get(id)?.losses.length ?? 0),
  nodeCard: (nodeId) => {
    for (const [node, card] of nodeCards) if (String(node.id) === String(nodeId)) return cardState(card);
    return null;
  },
  panelCards: () => [...panel.cards.values()].filter((c) => c.root.isConnected).map(cardState),
  stats: () => ({ ...stats, jobs: jobs.size, views: views.size }),
});

// ---------------------------------------------------------------------------------------------------------
app.registerExtension({
  name: "dopsd.jobs",

  async setup() {
    const link = document.createElement("link");
    link.rel = "stylesheet";
    link.href = new URL("./dopsd.css", import.meta.url).href;
    document.head.appendChild(link);

    api.addEventListener("dopsd.progress", (e) => onProgress(e.detail));
    api.addEventListener("dopsd.state", (e) => onState(e.detail));
    api.addEventListener("dopsd.preview", (e) => onPreview(e.detail));
    api.addEventListener("executed", (e) => {
      const d = e.detail;
      const id = d?.output?.dopsd_job?.[0];
      if (id) {
        bindJob(d.display_node ?? d.node, id);
        if (!jobs.has(id)) refreshJob(id);
        scheduleRender();
      }
    });
    api.addEventListener("reconnected", () => refreshAll());
    setInterval(() => {
      if ([...jobs.values()].some((j) => ACTIVE.has(j.state))) refreshAll();
    }, POLL_MS);

    registerSidebar();
    window.__DOPSD_WEB_LOADED__ = true;
    await refreshAll();
  },

  nodeCreated(node) {
    if (node.comfyClass === TRAINER) attachToTrainer(node);
  },
});
