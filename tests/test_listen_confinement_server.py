"""The --listen threat model through a real ComfyUI server: a remote client that can upload files and post
prompts (dataset, teacher preview, /view, Save LoRA, Import PEFT, resume) reads and writes nothing outside
ComfyUI's folders, and learns nothing about files there from the error messages."""
import json
import os
import time
import urllib.request
import uuid

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_QWEN3_FILE, TINY_ZIMAGE_FILE

pytestmark = pytest.mark.server
SECRET = (255, 0, 255)  # the colour of the file outside ComfyUI: seeing it anywhere in ComfyUI's folders is a leak


def _upload(server, name, data: bytes, subfolder=""):
    """POST /upload/image (multipart), as ComfyUI's frontend does; returns (status, body)."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
             f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"]
    for key, value in (("subfolder", subfolder), ("type", "input"), ("overwrite", "true")):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(server.url + "/upload/image", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _png(color, size=(64, 64)) -> bytes:
    import io
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _models():
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_ZIMAGE_FILE, "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": TINY_QWEN3_FILE, "type": "lumina2"}},
        "3": {"class_type": "TestTinyVAE", "inputs": {"kind": "flux", "seed": 0}},
        "4": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": 3.0}},
    }


def _pairs(folder):
    # the prefix keeps the teacher different from the student on hosts where Z-Image ignores reference latents
    return _models() | {
        "10": {"class_type": "DOPSDDatasetFromFolder", "inputs": {"folder": folder, "trigger": "sks", "resolution": 64}},
        "11": {"class_type": "DOPSDTeacherReferenceLatent", "inputs": {
            "dataset": ["10", 0], "clip": ["2", 0], "vae": ["3", 0], "teacher_prompt_prefix": "like the reference:"}},
    }


def _preview(folder):
    return _pairs(folder) | {
        "12": {"class_type": "DOPSDTeacherPreview", "inputs": {
            "model": ["4", 0], "pairs": ["11", 0], "vae": ["3", 0], "steps": 2, "schedule": "auto", "pair_index": 0,
            "seed": 0}},
        "13": {"class_type": "PreviewImage", "inputs": {"images": ["12", 0]}},
    }


def _trainer(folder, **over):
    inputs = {"model": ["4", 0], "pairs": ["11", 0], "method": "dopsd", "steps": 2, "inference_steps": 4,
              "train_steps": 2, "schedule": "auto", "loss_space": "x0", "rank": 2, "alpha": 2.0,
              "learning_rate": 0.01, "ema_decay": 0.9, "ema_warmup": False, "detach_states": True, "precision": "fp32",
              "grad_accum": 1, "grad_clip": 1.0, "gradient_checkpointing": False, "seed": 0, "save_prefix": "",
              "save_every": 0, "preview_every": 0, "targets": "auto", "resume_from": ""}
    inputs.update(over)
    return _pairs(folder) | {"20": {"class_type": "DOPSDTrainer", "inputs": inputs},
                             "21": {"class_type": "DOPSDWaitForJob", "inputs": {"job": ["20", 0], "timeout_s": 120}}}


def _rejected(server, prompt):
    """POST /prompt expecting ComfyUI to refuse nodes at validation; returns the node errors' text. (ComfyUI
    still runs the prompt's other, valid output nodes: then this waits for them, so prompts do not overlap.)"""
    status, body = server.request("POST", "/prompt", {"prompt": prompt, "client_id": server.client_id})
    assert status in (200, 400) and body.get("node_errors"), f"expected a validation error, got {status}: {body}"
    if status == 200:
        entry = server.wait_history(body["prompt_id"], timeout=180)
        assert not set(body["node_errors"]) & set(entry.get("outputs", {})), "a refused node ran"
    return json.dumps(body["node_errors"])


def _failed(server, prompt):
    """Run a prompt that must fail at execution; returns its error message."""
    pid = server.post_prompt(prompt)
    with pytest.raises(AssertionError) as e:
        server.wait_history(pid, timeout=120)
    entry = server.get_json(f"/history/{pid}")[pid]
    assert not any(out.get("images") for out in entry.get("outputs", {}).values())
    return str(e.value)


def _options(server, node, name):
    """A combo's choices from /object_info (V1: [choices, {...}]; V3: ["COMBO", {"options": choices}])."""
    spec = server.get_json(f"/object_info/{node}")[node]["input"]["required"][name]
    return spec[0] if isinstance(spec[0], list) else spec[1]["options"]


def _target_colour(server, entry):
    """The mean colour of the Teacher Preview's target panel, fetched through /view."""
    import io
    image = entry["outputs"]["13"]["images"][2]
    status, png = server.request("GET", f"/view?filename={image['filename']}&subfolder={image['subfolder']}"
                                        f"&type={image['type']}")
    assert status == 200 and png[:4] == b"\x89PNG"
    return tuple(int(round(c)) for c in np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3).mean(0))


def _snapshot(folder):
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            out[p] = (st.st_size, st.st_mtime_ns)
    return out


def _leaks(base):
    """Images in ComfyUI's output/temp folders that show the outside file's colour."""
    found = []
    for sub in ("output", "temp"):
        for root, _, files in os.walk(base / sub):
            for name in files:
                if name.lower().endswith(".png"):
                    a = np.asarray(Image.open(os.path.join(root, name)).convert("RGB")).astype(int)
                    if (np.abs(a - np.array(SECRET)).max(-1) < 16).mean() > 0.1:
                        found.append(os.path.join(root, name))
    return found


def test_a_remote_client_stays_inside_comfyui_folders(comfy_server, tmp_path):
    server, base = comfy_server, comfy_server.base_dir
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.png"
    secret.write_bytes(_png(SECRET))
    (outside / "training_state.pt").write_bytes(b"not yours")
    (outside / "adapter").mkdir()
    (outside / "adapter" / "adapter_config.json").write_text("{}")
    (outside / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    (outside / "peft_target").mkdir()
    before = _snapshot(outside)
    t0 = time.time()

    # upload: a dataset goes into input/; an upload cannot climb out of it
    ds = f"listen_{uuid.uuid4().hex[:6]}"
    assert _upload(server, "good.png", _png((20, 160, 40)), ds)[0] == 200
    assert _upload(server, "good.txt", b"a [trigger] square", ds)[0] == 200
    assert _upload(server, "x.png", _png((1, 2, 3)), "../../" + os.path.relpath(outside, base))[0] != 200

    # dataset + preview + view: rows naming the outside file are refused, the same words whether it exists or not
    rows = {"abs": str(secret), "rel": os.path.relpath(secret, base / "input" / ds),
            "abs_missing": str(outside / "none.png"), "rel_missing": os.path.relpath(outside / "none.png",
                                                                                     base / "input" / ds)}
    messages = set()
    for name, row in rows.items():
        assert _upload(server, f"{name}.jsonl", json.dumps({"image": row, "caption": "x"}).encode(), ds)[0] == 200
        msg = _failed(server, _preview(f"{ds}/{name}.jsonl"))
        assert "outside the dataset's folder and ComfyUI's input directory" in msg
        messages.add(msg.split("outside the dataset's folder")[1].split("\\n")[0])
    assert len(messages) == 1, messages
    entry = server.run_prompt(_preview(ds), timeout=120)  # the same graph on an allowed dataset works
    assert _target_colour(server, entry) == (20, 160, 40)
    # the folder changed: ComfyUI's cache must not serve the old dataset (the node's fingerprint changes)
    assert _upload(server, "good.png", _png((30, 30, 220)), ds)[0] == 200
    assert _target_colour(server, server.run_prompt(_preview(ds), timeout=120)) == (30, 30, 220)
    status, _ = server.request("GET", f"/view?filename=secret.png&type=input&subfolder=../../{os.path.relpath(outside, base)}")
    assert status != 200

    # an image LIST (ComfyUI's own folder loader, images of two sizes) is one dataset: one preview, not one per image
    for name, size in (("wide.png", (96, 64)), ("tall.png", (64, 96))):
        assert _upload(server, name, _png((200, 60, 20), size), ds + "_list")[0] == 200
    listed = _preview(ds) | {
        "10": {"class_type": "LoadImageDataSetFromFolder", "inputs": {"folder": ds + "_list"}},
        "14": {"class_type": "DOPSDDatasetFromImages", "inputs": {"images": ["10", 0], "captions": "a [trigger] thing",
                                                                  "trigger": "sks", "resolution": 64}}}
    listed["11"]["inputs"]["dataset"] = ["14", 0]
    entry = server.run_prompt(listed, timeout=120)
    assert len(entry["outputs"]["13"]["images"]) == 3  # student | teacher | target, once

    # save: a <name>_peft link out of models/loras is refused before anything is written
    loras = base / "models" / "loras"
    (loras / "listen").mkdir(exist_ok=True)
    os.symlink(outside / "peft_target", loras / "listen" / "evil_peft")
    save = {"30": {"class_type": "DOPSDSaveLoRA", "inputs": {"job": ["21", 0], "filename": "listen/evil",
                                                             "overwrite": False, "also_peft": True}}}
    assert "link to a place outside" in _rejected(server, _trainer(ds) | save)
    save["30"]["inputs"]["filename"] = "listen/ok"
    entry = server.run_prompt(_trainer(ds) | save, timeout=180)
    saved = loras / "listen" / "ok.safetensors"
    assert saved.is_file() and (loras / "listen" / "ok_peft" / "adapter_model.safetensors").is_file()
    assert os.stat(saved).st_mode & 0o077, "saved with the user's umask, not 0600"
    assert not [n for n in os.listdir(loras / "listen") if n.startswith(".")], "no temp file left in models/loras"
    assert not [n for n in _options(server, "LoraLoaderModelOnly", "lora_name") if "tmp" in n]

    # import: only adapters inside ComfyUI's folders are offered; an outside path is not accepted
    os.symlink(outside / "adapter", loras / "listen" / "linked_adapter")
    options = _options(server, "DOPSDImportPEFT", "peft_path")
    assert "listen/ok_peft" in options and not [o for o in options if "linked_adapter" in o or "outside" in o]
    imp = {"40": {"class_type": "DOPSDImportPEFT", "inputs": {"model": ["4", 0], "peft_path": str(outside / "adapter"),
                                                              "strength": 1.0, "save_as": ""}},
           "41": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["2", 0]}},
           "42": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
           "43": {"class_type": "KSampler", "inputs": {
               "model": ["40", 0], "seed": 0, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
               "positive": ["41", 0], "negative": ["41", 0], "latent_image": ["42", 0], "denoise": 1.0}},
           "44": {"class_type": "SaveLatent", "inputs": {"samples": ["43", 0], "filename_prefix": "listen/x"}}}
    errors = _rejected(server, _models() | imp)
    assert "is not among the adapters" in errors
    imp["40"]["inputs"]["peft_path"] = str(outside / "no_adapter")
    assert _rejected(server, _models() | imp).replace("no_adapter", "adapter") == errors  # nothing told

    # resume: a training state outside ComfyUI's folders is refused, the same words whether it exists or not
    there = _rejected(server, _trainer(ds, resume_from=str(outside / "training_state.pt")))
    missing = _rejected(server, _trainer(ds, resume_from=str(outside / "nothing.pt")))
    assert "not a training state in output/dopsd_jobs or input" in there
    assert there.replace(str(outside / "training_state.pt"), "P") == missing.replace(str(outside / "nothing.pt"), "P")

    # nothing outside was written, and nothing of it shows up in ComfyUI's folders
    assert _snapshot(outside) == before
    assert not os.listdir(outside / "peft_target")
    assert _leaks(base) == []
    assert time.time() - t0 < 120
