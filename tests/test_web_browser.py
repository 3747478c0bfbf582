"""The pack's frontend extension in the real ComfyUI frontend, driven in headless Chromium.

A real ComfyUI server with the pack (the comfy_server fixture) serves the real frontend (comfyui-frontend-package);
Chromium loads it, and the tests act through the page: load the shipped workflows, queue the FLUX.2-klein training
workflow on the tiny models, watch the trainer node's progress bar and loss chart update, pause / resume / stop with
the card's own buttons, reload the page and find the job again in the D-OPSD sidebar panel.
Screenshots go to out/test-artifacts/web/ (or $DOPSD_ARTIFACTS/web/); docs/web.md lists them.
Needs Chromium (`apt-get install chromium`; .ci/run installs it). Without it these tests skip, unless
DOPSD_REQUIRE_BROWSER=1, which turns the skip into a failure (for CI).
"""
import json
import os
import time
from pathlib import Path

import pytest

import make_workflows
import tiny_workflows as T
import workflow_api as W
from browser import Browser, find_chromium

pytestmark = [pytest.mark.browser, pytest.mark.server]

EXT_URL = "/extensions/comfyui-dopsd/"
READY = "!!(window.app && window.app.graph && window.LiteGraph && window.__dopsd && window.__DOPSD_WEB_LOADED__)"
TERMINAL = ("finished", "stopped", "error")


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


@pytest.fixture(scope="module")
def page(comfy_server, tmp_path_factory):
    if not find_chromium():
        message = "no Chromium on this machine (apt-get install chromium)"
        if os.environ.get("DOPSD_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    comfy_server.set_setting("Comfy.TutorialCompleted", True)           # no first-run template dialog
    comfy_server.set_setting("Comfy.Workflow.ShowMissingModelsWarning", False)
    browser = Browser.launch(tmp_path_factory.mktemp("chromium") / "profile", width=1600, height=1100)
    try:
        page = browser.page
        page.navigate(comfy_server.url)
        page.wait_for(READY, timeout=120, message="ComfyUI frontend with the D-OPSD extension")
        yield page
    finally:
        browser.close()


def our_errors(page):
    """JavaScript errors that come from the pack's files (the frontend logs a few of its own)."""
    return [e for e in page.errors() if EXT_URL in e or "[dopsd]" in e]


def load_workflow(page, workflow):
    page.eval(f"app.loadGraphData({json.dumps(workflow)}).then(() => true)")
    page.wait_for("app.graph.nodes.length > 0", timeout=30)


def trainer_id(page):
    return page.eval("app.graph.nodes.find((n) => n.comfyClass === 'DOPSDTrainer')?.id ?? null")


def focus_node(page, node_id, scale=0.9, dx=420, dy=150):
    """Scroll the canvas so the node is at a fixed spot, at a readable zoom."""
    page.eval(f"""(() => {{ const n = app.graph.getNodeById({node_id});
        app.canvas.ds.scale = {scale};
        app.canvas.ds.offset = [{dx} / {scale} - n.pos[0], {dy} / {scale} - n.pos[1]];
        app.canvas.setDirty(true, true); return true; }})()""")
    time.sleep(0.5)


def card(page, node_id):
    return page.eval(f"__dopsd.nodeCard({json.dumps(str(node_id))})")


def queue_from_run_button(page):
    """Clicks the frontend's Run button (falls back to app.queuePrompt if the button is not found)."""
    selector = '[data-testid="queue-button"] button'
    if page.eval(f"!!document.querySelector({json.dumps(selector)})"):
        page.click(selector)
        return "button"
    page.eval("app.queuePrompt(0).then(() => true)")
    return "app.queuePrompt"


def frame_stats(page, ms=1500):
    """Animation frames the page draws in `ms` and the longest gap between two (ms)."""
    return page.eval(f"""new Promise((resolve) => {{
        const t0 = performance.now(); let n = 0, last = t0, gap = 0;
        const tick = (t) => {{ n++; gap = Math.max(gap, t - last); last = t;
            if (t - t0 < {ms}) requestAnimationFrame(tick); else resolve({{frames: n, maxGap: gap}}); }};
        requestAnimationFrame(tick); }})""")


# -- tests -------------------------------------------------------------------------------------------------------
def test_extension_loads_and_registers_the_sidebar_panel(page, shots):
    assert page.eval("typeof window.__dopsd.jobs") == "function"
    assert page.eval("!!document.querySelector('.dopsd-jobs-tab-button')"), "D-OPSD sidebar tab button"
    css = page.eval("[...document.styleSheets].some((s) => (s.href || '').includes('/extensions/comfyui-dopsd/dopsd.css'))")
    assert css, "dopsd.css is loaded"
    assert our_errors(page) == []


@pytest.mark.parametrize("name", T.ALL)
def test_shipped_workflow_loads_and_queues_like_workflow_api(page, object_info, shots, name):
    wf = T.load(name)
    load_workflow(page, wf)
    assert page.eval("app.graph.nodes.length") == len(wf["nodes"])
    missing = page.eval("app.graph.nodes.filter((n) => n.type !== 'MarkdownNote' && !LiteGraph.registered_node_types[n.type]).map((n) => n.type)")
    assert missing == []
    frontend = page.eval("app.graphToPrompt().then((r) => r.output)")
    ours = W.to_api(wf, object_info)
    strip = lambda p: {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in p.items()}  # noqa: E731
    assert strip(frontend) == strip(ours)
    tid = trainer_id(page)
    if tid is not None:
        c = card(page, tid)
        assert c and c["state"] == "idle" and not any(c["buttons"].values())
    page.eval("app.canvas.ds.scale = 0.62; app.canvas.ds.offset = [140, 190]; app.canvas.setDirty(true, true); true")
    time.sleep(0.6)
    page.screenshot(shots / f"workflow - {name}.png")
    assert our_errors(page) == []


def test_template_browser_lists_and_opens_the_workflows(page, shots):
    """ComfyUI's template browser (Templates > Extensions > comfyui-dopsd) shows the six workflows with their
    thumbnails, and clicking one opens it."""
    page.eval("app.extensionManager.command.execute('Comfy.BrowseTemplates').then(() => true)")
    page.wait_for("[...document.querySelectorAll('span')].some((e) => e.textContent.trim() === 'comfyui-dopsd')",
                  timeout=30, message="the pack in the template browser's extension list")
    page.eval("""(() => { const s = [...document.querySelectorAll('span')].find((e) => e.textContent.trim() === 'comfyui-dopsd');
        s.setAttribute('data-dopsd-test', 'templates'); return true; })()""")
    page.click("[data-dopsd-test='templates']")
    cards = page.wait_for("""(() => { const cards = [...document.querySelectorAll('[data-testid^="template-workflow-"]')];
        const ours = cards.filter((c) => c.dataset.testid.startsWith('template-workflow-D-OPSD'));
        const ok = ours.length === N_OURS && ours.every((c) => { const i = c.querySelector('img'); return i && i.complete && i.naturalWidth > 0; });
        return ok && ours.map((c) => c.dataset.testid.slice('template-workflow-'.length)); })()""".replace("N_OURS", str(len(T.ALL))),
                          timeout=30, message="the D-OPSD templates with thumbnails")
    assert sorted(cards) == sorted(T.ALL)
    time.sleep(0.5)
    page.screenshot(shots / "template-browser.png")
    page.click(f'[data-testid="template-workflow-{T.TRAIN_KLEIN}"]')
    page.wait_for("app.graph.nodes.some((n) => n.comfyClass === 'DOPSDTeacherReferenceLatent')", timeout=30,
                  message="the clicked template is loaded")
    page.wait_for("!document.querySelector('[data-testid=\"template-workflows-content\"]')", timeout=30,
                  message="the template dialog closes")
    assert page.eval("app.graph.nodes.length") == len(T.load(T.TRAIN_KLEIN)["nodes"])


def test_workflow_files_are_what_make_workflows_builds(page):
    """workflows/*.json are exactly what tests/make_workflows.py produces in this frontend (run it after edits)."""
    for name, make in make_workflows.WORKFLOWS_SPEC.items():
        spec = make_workflows.prepare_spec(make())
        built = page.eval(f"({make_workflows.BUILD_JS})({json.dumps(spec)})")
        built.pop("id", None)
        assert make_workflows.dumps(built) == (T.WORKFLOW_DIR / f"{name}.json").read_text(encoding="utf-8"), \
            f"{name}.json is stale: run `.venv/bin/python tests/make_workflows.py`"


def test_training_job_in_the_browser_progress_chart_pause_stop_reload(page, comfy_server, object_info, assets, shots):
    prefix = f"dopsd/browser_{int(time.time() * 1000)}"
    wf = T.tiny_workflow(T.load(T.TRAIN_KLEIN), object_info, train_steps=100000, preview_every=2, save_prefix=prefix)
    load_workflow(page, wf)
    tid = trainer_id(page)
    focus_node(page, tid)
    assert queue_from_run_button(page) == "button"  # frontend 1.32.9 has it; a newer one may rename it

    # progress and loss chart update, read through the page
    first = page.wait_for(f"(() => {{ const c = __dopsd.nodeCard('{tid}'); return c && c.jobId && c.chartPoints >= 2 && c; }})()",
                          timeout=240, message="two loss points on the trainer card")
    job_id = first["jobId"]
    assert first["state"] == "running" and first["visible"]
    assert first["progressText"].startswith("step ") and "/ 100000" in first["progressText"]
    assert "it/s" in first["stats"] and "loss" in first["stats"]
    later = page.wait_for(f"(() => {{ const c = __dopsd.nodeCard('{tid}'); return c.chartPoints > {first['chartPoints']} && c; }})()",
                          timeout=120, message="the chart gains a point")
    assert later["progressText"] != first["progressText"]
    previews = page.wait_for(f"(() => {{ const c = __dopsd.nodeCard('{tid}'); const p = c.previews;"
                             " return p && p.student.loaded && p.teacher.loaded && p; })()",
                             timeout=120, message="student and teacher previews shown")
    assert f"subfolder=dopsd%2F{job_id}" in previews["student"]["src"]
    fps = frame_stats(page)
    assert fps["frames"] >= 5 and fps["maxGap"] < 1000, f"the canvas must keep drawing while training: {fps}"
    page.screenshot(shots / "training-running.png")

    # Pause / Resume with the card's buttons
    page.click(f'.dopsd-node-card[data-node-id="{tid}"] .dopsd-btn-pause')
    page.wait_for(f"__dopsd.nodeCard('{tid}').state === 'paused'", timeout=60, message="paused")
    assert comfy_server.get_json(f"/dopsd/jobs/{job_id}")["state"] == "paused"
    page.screenshot(shots / "training-paused.png")
    page.click(f'.dopsd-node-card[data-node-id="{tid}"] .dopsd-btn-resume')
    page.wait_for(f"__dopsd.nodeCard('{tid}').state === 'running'", timeout=60, message="running again")

    # Stop with the card's button: the job stops (and saves)
    page.click(f'.dopsd-node-card[data-node-id="{tid}"] .dopsd-btn-stop')
    stopped = page.wait_for(f"(() => {{ const c = __dopsd.nodeCard('{tid}'); return c.state === 'stopped' && c; }})()",
                            timeout=180, message="stopped")
    status = comfy_server.get_json(f"/dopsd/jobs/{job_id}")
    assert status["state"] == "stopped" and status["step"] < 100000
    assert status["lora_path"] and Path(status["lora_path"]).is_file(), "Stop saves the LoRA"
    assert not any(stopped["buttons"].values())
    focus_node(page, tid)
    page.screenshot(shots / "training-stopped.png")
    assert our_errors(page) == []

    # Reload: the state comes back from the routes, on the node and in the sidebar panel
    page.reload()
    page.wait_for(READY, timeout=120, message="frontend after reload")
    page.wait_for(f"__dopsd.jobs().some((j) => j.job_id === '{job_id}')", timeout=30, message="job list after reload")
    page.click(".dopsd-jobs-tab-button")
    panel = page.wait_for(f"(() => {{ const c = __dopsd.panelCards().find((c) => c.jobId === '{job_id}');"
                          " return c && c.visible && c; })()", timeout=30, message="job card in the sidebar panel")
    assert panel["state"] == "stopped" and panel["chartPoints"] >= 2 and panel["progressText"] == stopped["progressText"]
    # the frontend restores the open workflow; the trainer node remembers its job (node property) and shows it
    assert page.eval(f"app.graph.getNodeById({tid})?.properties?.dopsd_job_id ?? null") == job_id
    node_card = page.wait_for(f"(() => {{ const c = __dopsd.nodeCard('{tid}'); return c && c.jobId === '{job_id}' && c; }})()",
                              timeout=30, message="the job on the restored trainer node")
    assert node_card["state"] == "stopped" and node_card["chartPoints"] == panel["chartPoints"]
    page.screenshot(shots / "panel-after-reload.png")
    page.click(".dopsd-jobs-tab-button")  # close the panel again
    assert our_errors(page) == []


def test_job_error_is_shown_on_the_node(page, comfy_server, object_info, assets, shots):
    """A job that fails in its thread (here: resume_from is not a training-state file) shows the error."""
    wf = T.tiny_workflow(T.load(T.TRAIN_KLEIN), object_info, train_steps=5, save_prefix="")
    info = object_info["DOPSDTrainer"]
    trainer = next(n for n in wf["nodes"] if n["type"] == "DOPSDTrainer")
    trainer["widgets_values"][W.widget_layout(info).index("resume_from")] = str(assets["dataset"] / "item0.png")
    load_workflow(page, wf)
    tid = trainer_id(page)
    focus_node(page, tid)
    page.eval("app.queuePrompt(0).then(() => true)")
    failed = page.wait_for(f"(() => {{ const c = __dopsd.nodeCard('{tid}'); return c && c.state === 'error' && c; }})()",
                           timeout=240, message="job error on the card")
    assert failed["error"] and failed["error"].startswith("Error: ")
    assert comfy_server.get_json(f"/dopsd/jobs/{failed['jobId']}")["error"] in failed["error"]
    page.screenshot(shots / "job-error.png")


def test_event_storm_does_not_freeze_the_canvas(page):
    """5000 progress events in a burst: handlers stay cheap and redraws are batched per animation frame."""
    result = page.eval("""(async () => {
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
