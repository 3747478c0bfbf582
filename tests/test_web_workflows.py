"""The shipped example workflows (workflows/*.json): format, node types, link types, template discovery, and
each one executed on the tiny models in the real ComfyUI server.

The browser tests (test_web_browser.py) add: each file loads in the real frontend, the frontend's own
graphToPrompt() equals workflow_api.to_api(), and the files are what tests/make_workflows.py builds.
"""
import json
import time
import urllib.parse

import pytest

import comfy_server as server_lib
import tiny_workflows as T
import workflow_api as W

EXPECTED = set(T.ALL)


# -- static ---------------------------------------------------------------------------------------------------
def test_the_six_workflows_are_shipped():
    assert set(T.shipped_names()) == EXPECTED


@pytest.mark.parametrize("name", T.ALL)
def test_workflow_is_ui_format_with_notes(name):
    wf = T.load(name)
    assert wf["version"] == 0.4 and isinstance(wf["nodes"], list) and isinstance(wf["links"], list)
    ids = [n["id"] for n in wf["nodes"]]
    assert len(ids) == len(set(ids)) and wf["last_node_id"] >= max(ids)
    assert wf["last_link_id"] >= max((link[0] for link in wf["links"]), default=0)
    for n in wf["nodes"]:
        assert {"id", "type", "pos", "size", "mode", "inputs", "outputs", "properties"} <= set(n), n["type"]
        assert n["mode"] == 0, f"node {n['id']} ({n['type']}) is muted or bypassed"
    notes = [n for n in wf["nodes"] if n["type"] == "MarkdownNote"]
    assert notes, "every workflow carries a note telling the user which files go where"
    text = "\n".join(n["widgets_values"][0] for n in notes)
    # every model file a loader names is in the note, with the folder it goes in
    folders = {"UNETLoader": "diffusion_models/", "CLIPLoader": "text_encoders/", "VAELoader": "vae/"}
    for n in wf["nodes"]:
        if n["type"] in folders:
            assert n["widgets_values"][0] in text, f"{n['widgets_values'][0]} not explained in the note"
            assert folders[n["type"]] in text
        if n["type"] == "DOPSDTeacherVLMSplice":
            assert "Qwen3-VL-4B-Instruct" in text and "text_encoders/Qwen3-VL-4B-Instruct" in text
        if n["type"] == "LoraLoaderModelOnly":
            assert "models/loras/" in text
    for link in wf["links"]:
        origin = next(n for n in wf["nodes"] if n["id"] == link[1])
        target = next(n for n in wf["nodes"] if n["id"] == link[3])
        assert link[0] in origin["outputs"][link[2]]["links"]
        assert target["inputs"][link[4]]["link"] == link[0]


def test_training_workflows_use_the_few_step_schedules():
    for name, steps in ((T.TRAIN_ZIMAGE, 8), (T.TRAIN_KLEIN, 4), (T.TRAIN_QWEN, 8)):
        trainer = next(n for n in T.load(name)["nodes"] if n["type"] == "DOPSDTrainer")
        assert trainer["widgets_values"][2] == steps  # inference_steps (method, steps, inference_steps, ...)


# -- against the real server ------------------------------------------------------------------------------------
on_server = pytest.mark.server


@on_server
@pytest.mark.parametrize("name", T.ALL)
def test_every_node_type_exists_in_object_info(comfy_server, object_info, name):
    missing = {n["type"] for n in T.load(name)["nodes"]} - set(object_info) - W.FRONTEND_ONLY
    assert not missing, f"{name}: node types missing from /object_info: {missing}"


@on_server
@pytest.mark.parametrize("name", T.ALL)
def test_links_are_type_correct(comfy_server, object_info, name):
    assert W.link_type_problems(T.load(name), object_info) == []


@on_server
@pytest.mark.parametrize("name", T.ALL)
def test_widget_values_fit_the_node_definitions(comfy_server, object_info, name):
    wf = T.load(name)
    prompt = W.to_api(wf, object_info)  # raises on a widget count mismatch
    for node_id, node in prompt.items():
        info = object_info[node["class_type"]]
        for input_name, type_, opts, _ in W.input_specs(info):
            if input_name not in node["inputs"]:
                continue
            value = node["inputs"][input_name]
            if isinstance(value, list):
                continue  # a link
            if isinstance(type_, list) or type_ == "COMBO":
                options = type_ if isinstance(type_, list) else opts.get("options", [])
                model_file = input_name.endswith("_name") and str(value).endswith(".safetensors")
                assert model_file or value in options, f"{name} node {node_id}: {input_name}={value!r} not in {options}"
            elif type_ in ("INT", "FLOAT"):
                assert isinstance(value, (int, float)) and not isinstance(value, bool)
                assert opts.get("min", value) <= value <= opts.get("max", value), (name, node_id, input_name, value)
            elif type_ == "BOOLEAN":
                assert isinstance(value, bool)
            elif type_ == "STRING":
                assert isinstance(value, str)


@on_server
def test_template_browser_lists_and_serves_the_workflows(comfy_server):
    listed = comfy_server.get_json("/workflow_templates")
    assert set(listed.get(server_lib.PACK_DIR_NAME, [])) == EXPECTED, listed
    for name in T.ALL:
        path = f"/api/workflow_templates/{server_lib.PACK_DIR_NAME}/{urllib.parse.quote(name)}.json"
        status, body = comfy_server.request("GET", path)
        assert status == 200, (path, status)
        served = body if isinstance(body, dict) else json.loads(body)
        assert served == T.load(name)
        status, thumb = comfy_server.request("GET", path[:-len(".json")] + ".jpg")
        assert status == 200 and thumb[:3] == b"\xff\xd8\xff", f"{name}.jpg thumbnail for the template browser"


# -- execution on the tiny models -------------------------------------------------------------------------------
def _run(server, object_info, name, timeout=300.0, **edits):
    wf = T.tiny_workflow(T.load(name), object_info, **edits)
    return server.run_prompt(W.to_api(wf, object_info), timeout=timeout)


def _wait_job(server, job_id, timeout=300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = server.get_json(f"/dopsd/jobs/{job_id}")
        if status["state"] in ("finished", "stopped", "error"):
            return status
        time.sleep(0.25)
    raise TimeoutError(f"job {job_id} still {status['state']} after {timeout} s")


def _job_of(entry):
    for out in entry["outputs"].values():
        if "dopsd_job" in out:
            return out["dopsd_job"][0]
    raise AssertionError(f"no trainer output in {entry['outputs']}")


def _images(server, entry, node_type_ids):
    files = []
    for node_id in node_type_ids:
        for img in entry["outputs"].get(node_id, {}).get("images", []):
            folder = server.base_dir / ("output" if img["type"] == "output" else "temp")
            path = folder / img["subfolder"] / img["filename"]
            assert path.is_file(), path
            files.append(path)
    return files


@pytest.fixture(scope="module")
def trained_loras(comfy_server, object_info, assets):
    """Runs the training workflows on the tiny models; returns {family: lora file name under models/loras}."""
    out = {}
    for family, name in (("zimage", T.TRAIN_ZIMAGE), ("klein", T.TRAIN_KLEIN), ("qwenimage", T.TRAIN_QWEN)):
        prefix = f"dopsd/wf_{family}_{int(time.time() * 1000)}"
        entry = _run(comfy_server, object_info, name, vl_folder=assets["vl_folder"], train_steps=2,
                     preview_every=1, save_prefix=prefix)
        status = _wait_job(comfy_server, _job_of(entry))
        assert status["state"] == "finished", status.get("error")
        assert status["step"] == 2 and len(status["losses"]) == 2
        assert status["previews"] and status["previews"]["student"] and status["previews"]["teacher"]
        lora = T.lora_file_name(prefix, 2)
        assert (comfy_server.base_dir / "models" / "loras" / lora).is_file()
        out[family] = (lora, status)
    return out


@on_server
@pytest.mark.slow
def test_training_workflows_execute_and_train(trained_loras):
    for family, (lora, status) in trained_loras.items():
        assert status["method"] == "dopsd" and status["lora_path"].endswith(lora.split("/")[-1]), family


@on_server
@pytest.mark.slow
def test_teacher_preview_workflow_executes(comfy_server, object_info, assets):
    entry = _run(comfy_server, object_info, T.TEACHER_PREVIEW, vl_folder=assets["vl_folder"])
    wf = T.load(T.TEACHER_PREVIEW)
    shown = [str(n["id"]) for n in wf["nodes"] if n["type"] == "PreviewImage"]
    files = _images(comfy_server, entry, shown)
    assert len(files) == 3, "student | teacher | target"


@on_server
@pytest.mark.slow
@pytest.mark.parametrize("family,name", [("zimage", T.PREVIEW_ZIMAGE), ("klein", T.PREVIEW_KLEIN)])
def test_lora_preview_workflows_execute_with_the_trained_lora(comfy_server, object_info, trained_loras, family, name):
    lora, _ = trained_loras[family]
    entry = _run(comfy_server, object_info, name, lora_name=lora)
    wf = T.load(name)
    saves = {n["widgets_values"][0]: str(n["id"]) for n in wf["nodes"] if n["type"] == "SaveImage"}
    with_lora = _images(comfy_server, entry, [saves["dopsd/preview_lora"]])
    base = _images(comfy_server, entry, [saves["dopsd/preview_base"]])
    assert len(with_lora) == 1 and len(base) == 1
    import numpy as np
    from PIL import Image
    a, b = (np.asarray(Image.open(p), dtype=np.float32) for p in (with_lora[0], base[0]))
    assert a.shape == b.shape and np.abs(a - b).max() > 0, "the LoRA changes the 4/8-step sample"
