"""The pack's frontend extension in the real ComfyUI frontend, driven by Playwright in headless Chromium.

A real ComfyUI server with the pack (the comfy_server fixture) serves the host's own frontend (comfyui-frontend-package:
1.32.9 on ComfyUI 0.3.75, 1.49.6 on 0.33); Chromium loads it, and the tests act through the page as a user does: load
the shipped workflows, open them from the template browser, press Run on the FLUX.2-klein training workflow (tiny
models), watch the trainer node's progress bar and loss chart update, pause / resume / stop with the card's own
buttons, reload the page and find the job again in the D-OPSD sidebar tab.

Selectors are ones both frontends share: roles and accessible names (the sidebar tab "D-OPSD training jobs", the
template category "comfyui-dopsd"), ComfyUI's test ids (queue-button, template-workflow-<name>) and the pack's own
classes. Waits are on page states, never fixed sleeps. Screenshots go to $DOPSD_ARTIFACTS/web/ (scripts/test.sh sets
one folder per host; default out/test-artifacts/web/); docs/web.md lists them. Needs Chromium (`apt-get install
chromium`; .ci/run installs it). Without it these tests skip, unless DOPSD_REQUIRE_BROWSER=1, which turns the skip
into a failure (for CI).
"""
import json
import os
from pathlib import Path

import pytest

import comfy_env
import make_workflows
import tiny_workflows as T
import workflow_api as W
from browser import chromium_page, find_chromium, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.server]

EXT_URL = "/extensions/comfyui-dopsd/"
APP_READY = "!!(window.app && window.app.graph && window.LiteGraph && window.__dopsd && window.__DOPSD_WEB_LOADED__)"
SIDEBAR_TAB = dict(role="button", name="D-OPSD training jobs")      # aria-label = the tab's tooltip, both frontends
PANEL_HEADING = dict(role="heading", name="D-OPSD training jobs")   # the panel's own <h3>
# The Run button: 1.32.9 puts the test id on a split-button wrapper, 1.49.6 on the button itself.
RUN_BUTTON = 'button[data-testid="queue-button"], [data-testid="queue-button"] button[aria-label="Run"]'


def artifacts_dir() -> Path:
    root = Path(os.environ.get("DOPSD_ARTIFACTS") or Path(__file__).resolve().parent.parent / "out" / "test-artifacts")
    path = root / "web"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def shots():
    path = artifacts_dir()
    for old in path.glob("*.png"):
        old.unlink()
    return path


def wait_app_ready(page, timeout=120):
    """The frontend has booted with the pack's extension, and the controls a user reaches for are on screen (on
    1.49.6 a click that lands before the sidebar and action bar are mounted is swallowed)."""
    wait_for(page, APP_READY, timeout=timeout, message="ComfyUI frontend with the D-OPSD extension")
    page.locator(RUN_BUTTON).wait_for(state="visible", timeout=timeout * 1000)
    page.get_by_role(**SIDEBAR_TAB).wait_for(state="visible", timeout=timeout * 1000)


@pytest.fixture(scope="module")
def session(comfy_server):
    if not find_chromium():
        message = "no Chromium on this machine (apt-get install chromium)"
        if os.environ.get("DOPSD_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    comfy_server.set_setting("Comfy.TutorialCompleted", True)           # no first-run template dialog
    comfy_server.set_setting("Comfy.Workflow.ShowMissingModelsWarning", False)
    with chromium_page(width=1600, height=1100) as s:
        s.page.goto(comfy_server.url)
        wait_app_ready(s.page)
        yield s


@pytest.fixture
def page(session):
    return session.page


def our_errors(session):
    """JavaScript errors that come from the pack's files (the frontend logs a few of its own)."""
    return [e for e in session.errors() if EXT_URL in e or "[dopsd]" in e]


def frames_drawn(page, n=2):
    """Waits until the page has drawn `n` more animation frames (the canvas and DOM widgets caught up)."""
    page.evaluate(f"""new Promise((resolve) => {{ let left = {n};
        const tick = () => (--left <= 0 ? resolve(true) : requestAnimationFrame(tick)); requestAnimationFrame(tick); }})""")


def load_workflow(page, workflow):
    page.evaluate(f"app.loadGraphData({json.dumps(workflow)}).then(() => true)")
    wait_for(page, "app.graph.nodes.length > 0", timeout=30, message="the workflow's nodes")


def trainer_id(page):
    return page.evaluate("app.graph.nodes.find((n) => n.comfyClass === 'DOPSDTrainer')?.id ?? null")


def focus_node(page, node_id, scale=0.9, dx=420, dy=150):
    """Scroll the canvas so the node is at a fixed spot, at a readable zoom."""
    page.evaluate(f"""(() => {{ const n = app.graph.getNodeById({node_id});
        app.canvas.ds.scale = {scale};
        app.canvas.ds.offset = [{dx} / {scale} - n.pos[0], {dy} / {scale} - n.pos[1]];
        app.canvas.setDirty(true, true); return true; }})()""")
    frames_drawn(page, 3)


def card(page, node_id):
    return page.evaluate(f"__dopsd.nodeCard({json.dumps(str(node_id))})")


def card_button(page, node_id, label):
    return page.locator(f'.dopsd-node-card[data-node-id="{node_id}"]').get_by_role("button", name=label, exact=True)


def frame_stats(page, ms=1500):
    """Animation frames the page draws in `ms` and the longest gap between two (ms)."""
    return page.evaluate(f"""new Promise((resolve) => {{
        const t0 = performance.now(); let n = 0, last = t0, gap = 0;
        const tick = (t) => {{ n++; gap = Math.max(gap, t - last); last = t;
            if (t - t0 < {ms}) requestAnimationFrame(tick); else resolve({{frames: n, maxGap: gap}}); }};
        requestAnimationFrame(tick); }})""")


def open_sidebar_panel(page, attempts=3):
    """Clicks the D-OPSD sidebar tab until its panel shows (a frontend busy restoring a workflow may drop a click;
    each attempt waits on the panel's state)."""
    heading = page.get_by_role(**PANEL_HEADING)
    for attempt in range(attempts):
        page.get_by_role(**SIDEBAR_TAB).click()
        try:
            heading.wait_for(state="visible", timeout=10_000)
            return
        except Exception:  # noqa: BLE001  (Playwright's TimeoutError: try the click again)
            if attempt == attempts - 1:
                raise


def close_sidebar_panel(page):
    page.get_by_role(**SIDEBAR_TAB).click()
    page.get_by_role(**PANEL_HEADING).wait_for(state="hidden", timeout=10_000)


# -- tests -------------------------------------------------------------------------------------------------------
def test_extension_loads_and_registers_the_sidebar_panel(page, session, shots):
    assert page.evaluate("typeof window.__dopsd.jobs") == "function"
    assert page.get_by_role(**SIDEBAR_TAB).is_visible(), "D-OPSD sidebar tab button"
    css = page.evaluate("[...document.styleSheets].some((s) => (s.href || '').includes('/extensions/comfyui-dopsd/dopsd.css'))")
    assert css, "dopsd.css is loaded"
    open_sidebar_panel(page)
    page.screenshot(path=str(shots / f"sidebar-empty - frontend {comfy_env.frontend_version()}.png"))
    close_sidebar_panel(page)
    assert our_errors(session) == []


@pytest.mark.parametrize("name", T.ALL)
def test_shipped_workflow_loads_and_queues_like_workflow_api(page, session, object_info, shots, name):
    wf = T.load(name)
    load_workflow(page, wf)
    assert page.evaluate("app.graph.nodes.length") == len(wf["nodes"])
    missing = page.evaluate("app.graph.nodes.filter((n) => n.type !== 'MarkdownNote' && !LiteGraph.registered_node_types[n.type]).map((n) => n.type)")
    assert missing == []
    frontend = page.evaluate("app.graphToPrompt().then((r) => r.output)")
    ours = W.to_api(wf, object_info)
    strip = lambda p: {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in p.items()}  # noqa: E731
    assert strip(frontend) == strip(ours)
    # what this frontend would save is the same graph as the shipped file (its extra fields aside)
    saved = page.evaluate("app.graphToPrompt().then((r) => r.workflow)")
    assert make_workflows.essentials_diff(saved, wf) == []
    tid = trainer_id(page)
    if tid is not None:
        c = card(page, tid)
        assert c and c["state"] == "idle" and not any(c["buttons"].values())
    page.evaluate("app.canvas.ds.scale = 0.62; app.canvas.ds.offset = [140, 190]; app.canvas.setDirty(true, true); true")
    frames_drawn(page, 3)
    page.screenshot(path=str(shots / f"workflow - {name}.png"))
    assert our_errors(session) == []


def test_template_browser_lists_and_opens_the_workflows(page, shots):
    """ComfyUI's template browser (Templates > comfyui-dopsd) shows the six workflows with their thumbnails, and
    clicking one opens it."""
    page.evaluate("app.extensionManager.command.execute('Comfy.BrowseTemplates').then(() => true)")
    page.get_by_role("button", name="comfyui-dopsd", exact=True).click()
    cards = wait_for(page, """(() => { const cards = [...document.querySelectorAll('[data-testid^="template-workflow-"]')];
        const ours = cards.filter((c) => c.dataset.testid.startsWith('template-workflow-D-OPSD'));
        const ok = ours.length === N_OURS && ours.every((c) => { const i = c.querySelector('img'); return i && i.complete && i.naturalWidth > 0; });
        return ok && ours.map((c) => c.dataset.testid.slice('template-workflow-'.length)); })()""".replace("N_OURS", str(len(T.ALL))),
                     timeout=30, message="the D-OPSD templates with thumbnails")
    assert sorted(cards) == sorted(T.ALL)
    page.screenshot(path=str(shots / "template-browser.png"))
    page.get_by_test_id(f"template-workflow-{T.TRAIN_KLEIN}").click()
    wait_for(page, "app.graph.nodes.some((n) => n.comfyClass === 'DOPSDTeacherReferenceLatent')", timeout=30,
             message="the clicked template is loaded")
    page.get_by_test_id("template-workflows-content").wait_for(state="detached", timeout=30_000)
    assert page.evaluate("app.graph.nodes.length") == len(T.load(T.TRAIN_KLEIN)["nodes"])


def test_workflow_files_are_what_make_workflows_builds(page):
    """workflows/*.json hold the graphs tests/make_workflows.py builds in this frontend: the same node types, links,
    widget values and groups (run it after edits). Fields a frontend adds on save (sizes, named widget values, new
    outputs) are not compared, so one set of files serves both frontends."""
    for name, make in make_workflows.WORKFLOWS_SPEC.items():
        spec = make_workflows.prepare_spec(make())
        built = make_workflows.build_in_page(page, spec)
        shipped = json.loads((T.WORKFLOW_DIR / f"{name}.json").read_text(encoding="utf-8"))
        diff = make_workflows.essentials_diff(built, shipped)
        assert diff == [], f"{name}.json is stale: run `.venv/bin/python tests/make_workflows.py`: {diff}"


def test_training_job_in_the_browser_progress_chart_pause_stop_reload(page, session, comfy_server, object_info,
                                                                      assets, shots):
    prefix = f"dopsd/browser_{os.getpid()}"
    wf = T.tiny_workflow(T.load(T.TRAIN_KLEIN), object_info, train_steps=100000, preview_every=2, save_prefix=prefix)
    load_workflow(page, wf)
    tid = trainer_id(page)
    focus_node(page, tid, scale=0.6, dy=40)  # the whole trainer (about 30 widgets) and its card in the viewport
    page.locator(RUN_BUTTON).click()

    # progress and loss chart update, read through the page
    first = wait_for(page, f"(() => {{ const c = __dopsd.nodeCard('{tid}'); return c && c.jobId && c.chartPoints >= 2 && c; }})()",
                     timeout=240, message="two loss points on the trainer card")
    job_id = first["jobId"]
    assert first["state"] == "running" and first["visible"]
    assert first["progressText"].startswith("step ") and "/ 100000" in first["progressText"]
    assert "it/s" in first["stats"] and "loss" in first["stats"]
    later = wait_for(page, f"(() => {{ const c = __dopsd.nodeCard('{tid}'); return c.chartPoints > {first['chartPoints']} && c; }})()",
                     timeout=120, message="the chart gains a point")
    assert later["progressText"] != first["progressText"]
    previews = wait_for(page, f"(() => {{ const c = __dopsd.nodeCard('{tid}'); const p = c.previews;"
                        " return p && p.student.loaded && p.teacher.loaded && p; })()",
                        timeout=120, message="student and teacher previews shown")
    assert f"subfolder=dopsd%2F{job_id}" in previews["student"]["src"]
    fps = frame_stats(page)
    assert fps["frames"] >= 5 and fps["maxGap"] < 1000, f"the canvas must keep drawing while training: {fps}"
    page.screenshot(path=str(shots / "training-running.png"))

    # Pause / Resume with the card's buttons
    card_button(page, tid, "Pause").click()
    wait_for(page, f"__dopsd.nodeCard('{tid}').state === 'paused'", timeout=60, message="paused")
    assert comfy_server.get_json(f"/dopsd/jobs/{job_id}")["state"] == "paused"
    page.screenshot(path=str(shots / "training-paused.png"))
    card_button(page, tid, "Resume").click()
    wait_for(page, f"__dopsd.nodeCard('{tid}').state === 'running'", timeout=60, message="running again")

    # Stop with the card's button: the job stops (and saves)
    card_button(page, tid, "Stop").click()
    stopped = wait_for(page, f"(() => {{ const c = __dopsd.nodeCard('{tid}'); return c.state === 'stopped' && c; }})()",
                       timeout=180, message="stopped")
    status = comfy_server.get_json(f"/dopsd/jobs/{job_id}")
    assert status["state"] == "stopped" and status["step"] < 100000
    assert status["lora_path"] and Path(status["lora_path"]).is_file(), "Stop saves the LoRA"
    assert not any(stopped["buttons"].values())
    focus_node(page, tid)
    page.screenshot(path=str(shots / "training-stopped.png"))
    assert our_errors(session) == []

    # Reload: the state comes back from the routes, on the node and in the sidebar panel
    page.reload()
    wait_app_ready(page)
    wait_for(page, f"__dopsd.jobs().some((j) => j.job_id === '{job_id}')", timeout=30, message="job list after reload")
    open_sidebar_panel(page)
    panel = wait_for(page, f"(() => {{ const c = __dopsd.panelCards().find((c) => c.jobId === '{job_id}');"
                     " return c && c.visible && c; })()", timeout=30, message="job card in the sidebar panel")
    assert panel["state"] == "stopped" and panel["chartPoints"] >= 2 and panel["progressText"] == stopped["progressText"]
    # the frontend restores the open workflow; the trainer node remembers its job (node property) and shows it
    wait_for(page, f"app.graph.getNodeById({tid})?.properties?.dopsd_job_id === '{job_id}'", timeout=30,
             message="the restored trainer node remembers its job")
    node_card = wait_for(page, f"(() => {{ const c = __dopsd.nodeCard('{tid}'); return c && c.jobId === '{job_id}' && c; }})()",
                         timeout=30, message="the job on the restored trainer node")
    assert node_card["state"] == "stopped" and node_card["chartPoints"] == panel["chartPoints"]
    frames_drawn(page, 3)
    page.screenshot(path=str(shots / f"panel-after-reload - frontend {comfy_env.frontend_version()}.png"))
    close_sidebar_panel(page)
    assert our_errors(session) == []


def test_job_error_is_shown_on_the_node(page, comfy_server, object_info, assets, shots):
    """A job that fails in its thread (here: resume_from is not a training-state file) shows the error."""
    wf = T.tiny_workflow(T.load(T.TRAIN_KLEIN), object_info, train_steps=5, save_prefix="")
    info = object_info["DOPSDTrainer"]
    trainer = next(n for n in wf["nodes"] if n["type"] == "DOPSDTrainer")
    trainer["widgets_values"][W.widget_layout(info).index("resume_from")] = str(assets["dataset"] / "item0.png")
    load_workflow(page, wf)
    tid = trainer_id(page)
    focus_node(page, tid)
    page.locator(RUN_BUTTON).click()
    failed = wait_for(page, f"(() => {{ const c = __dopsd.nodeCard('{tid}'); return c && c.state === 'error' && c; }})()",
                      timeout=240, message="job error on the card")
    assert failed["error"] and failed["error"].startswith("Error: ")
    assert comfy_server.get_json(f"/dopsd/jobs/{failed['jobId']}")["error"] in failed["error"]
    frames_drawn(page, 3)
    page.screenshot(path=str(shots / "job-error.png"))


def test_resume_warning_is_shown_on_the_node(page, comfy_server, object_info, assets, shots):
    """A job resumed with another setting than its checkpoint's (here the learning rate) trains on, and the card
    shows the job's warning (JobStatus.warnings) with a toast. tests/test_retention_server.py checks the retention
    variants of the message through the route."""
    info = object_info["DOPSDTrainer"]
    layout = W.widget_layout(info)

    def run(**widgets):
        wf = T.tiny_workflow(T.load(T.TRAIN_KLEIN), object_info, train_steps=2, preview_every=0, save_prefix="")
        trainer = next(n for n in wf["nodes"] if n["type"] == "DOPSDTrainer")
        for name, value in widgets.items():
            trainer["widgets_values"][layout.index(name)] = value
        load_workflow(page, wf)
        tid = trainer_id(page)
        focus_node(page, tid)
        page.locator(RUN_BUTTON).click()
        return tid, wait_for(page, f"(() => {{ const c = __dopsd.nodeCard('{tid}'); return c && c.jobId && "
                                   "['finished', 'error'].includes(c.state) && c; })()",
                             timeout=240, message="the job to end on the card")

    _, first = run()
    assert first["state"] == "finished" and first["warning"] is None, first
    tid, resumed = run(resume_from=first["jobId"], learning_rate=5e-4, steps=3)
    assert resumed["state"] == "finished" and resumed["progressText"].startswith("step 3 / 3"), resumed
    [warning] = comfy_server.get_json(f"/dopsd/jobs/{resumed['jobId']}")["warnings"]
    assert warning.startswith("resuming with settings that differ from the checkpoint's: lr")
    assert resumed["warning"] == f"Warning: {warning}"
    toasts = page.locator(".p-toast-message", has_text="differ from the checkpoint's")
    toasts.first.wait_for(state="visible", timeout=10_000)
    assert toasts.count() == 1  # once, however many status updates carry the warning
    frames_drawn(page, 3)
    page.screenshot(path=str(shots / "job-resume-warning.png"))


def test_event_storm_does_not_freeze_the_canvas(page):
    """5000 progress events in a burst: handlers stay cheap and redraws are batched per animation frame."""
    result = page.evaluate("""(async () => {
        const before = __dopsd.stats();
        const t0 = performance.now();
        for (let i = 1; i <= 5000; i++) {
            window.comfyAPI.api.api.dispatchEvent(new CustomEvent('dopsd.progress', {detail: {
                job_id: 'storm', node_id: 'none', step: i, total_steps: 5000, loss: 1 / i, its_per_sec: 100,
                eta_s: (5000 - i) / 100, state: 'running'}}));
        }
        const handled = performance.now() - t0;
        await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
        const after = __dopsd.stats();
        return {handled, renders: after.renders - before.renders, events: after.progress - before.progress,
                points: __dopsd.chartPoints('storm')};
    })()""")
    assert result["events"] == 5000
    assert result["handled"] < 2000, result
    assert result["renders"] <= 5, f"redraws are batched: {result}"
    assert result["points"] <= 1000, "the client keeps at most 1000 chart points per job"
    fps = frame_stats(page, 1000)
    assert fps["frames"] >= 5, fps
