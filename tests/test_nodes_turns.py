"""Turn-taking between the prompt worker and jobs, and the HTTP routes, in-process."""
import asyncio
import queue
import threading
import time

import pytest
import torch

import comfy_fixtures as F
from nodes_support import encode, executor_mode, flux2_pairs, klein_clip, start_job, wait_state


@pytest.fixture(scope="module")
def N(pack):
    from comfyui_dopsd import nodes
    from comfyui_dopsd.nodes import jobs, routes, trainer_nodes  # noqa: F401
    from comfyui_dopsd.nodes.comfy_bridge import turns  # noqa: F401
    return nodes


@pytest.fixture(scope="module")
def flux2():
    with executor_mode():
        return F.build_tiny_flux2(seed=0), F.build_tiny_flux2_vae(seed=0)


class FakePromptQueue:
    """The two calls ComfyUI's prompt worker makes: get(timeout) and (later) get again."""

    def __init__(self):
        self.q = queue.Queue()

    def put(self, item):
        self.q.put(item)

    def get(self, timeout=None):
        try:
            return self.q.get(timeout=timeout)
        except queue.Empty:
            return None


def _sample(model, seed=5):
    import nodes as comfy_nodes
    cond = encode(klein_clip(), "a prompt")
    with executor_mode():
        return comfy_nodes.KSampler().sample(model, seed, 4, 1.0, "euler", "simple", cond, cond,
                                             {"samples": torch.zeros(1, 128, 4, 4)})[0]["samples"]


def test_prompt_during_training_equals_prompt_without_job_and_training_resumes(N, flux2):
    turns = N.comfy_bridge.turns
    model, vae = flux2
    reference = _sample(model)
    turn = turns.TURN
    fake = FakePromptQueue()
    turns._installed_on = None
    turns.install_on_queue(fake, turn, currently_in_prompt=True)  # as if called from the trainer node
    job, _ = start_job(N, model, flux2_pairs(N, vae), steps=100000)
    job.use_turns = True
    time.sleep(0.3)
    assert job.step == 0 and job.state == "waiting", "the job must wait until the starting prompt is done"
    results = {}

    def worker():  # ComfyUI's prompt_worker loop, reduced to the calls it makes
        end = time.time() + 30                   # empty waits (each releases the turn; the job trains meanwhile)
        while job.step < 1 and time.time() < end:
            fake.get(timeout=0.05)
        fake.put("prompt-2")
        item = fake.get(timeout=5)               # acquires the turn: the job parks at a step boundary
        steps_before = job.step
        results["during"] = _sample(model)       # the second prompt samples the same checkpoint
        time.sleep(0.3)
        results["parked"] = job.step == steps_before
        results["item"] = item
        fake.get(timeout=0.01)                   # next get: turn released (and taken again when it returns)

    t = threading.Thread(target=worker)
    t.start()
    t.join(30)
    turn.worker_release()                        # the worker's next get, had the loop gone on
    assert results["item"] == "prompt-2" and results["parked"], "training must pause while a prompt runs"
    assert torch.equal(results["during"], reference), "a prompt's output must not change while a job trains"
    steps = job.step
    end = time.time() + 30
    while job.step <= steps and time.time() < end:
        time.sleep(0.05)
    assert job.step > steps, "training resumes after the prompt"
    job.stop(save=False)
    assert wait_state(job, ("stopped",)) == "stopped"
    assert torch.equal(_sample(model), reference)
    turns._installed_on = None
    turn.worker_release()


def _client(N):
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer
    app = web.Application()
    routes = web.RouteTableDef()
    N.routes.register(routes)
    app.add_routes(routes)
    return TestClient(TestServer(app))


def test_routes_list_status_pause_resume_stop_and_errors(N, flux2):
    model, vae = flux2
    job, _ = start_job(N, model, flux2_pairs(N, vae), steps=100000)
    job.use_turns = False
    wait_state(job, ("running",))

    async def scenario():
        client = _client(N)
        await client.start_server()
        try:
            r = await client.get("/dopsd/jobs")
            assert r.status == 200 and job.job_id in [j["job_id"] for j in (await r.json())["jobs"]]
            r = await client.get(f"/dopsd/jobs/{job.job_id}")
            body = await r.json()
            assert r.status == 200 and body["state"] in ("running", "waiting") and body["total_steps"] == 100000
            assert (await client.get("/dopsd/jobs/doesnotexist")).status == 404
            assert (await client.post("/dopsd/jobs/doesnotexist/stop")).status == 404
            assert (await client.post(f"/dopsd/jobs/{job.job_id}/resume")).status == 409
            r = await client.post(f"/dopsd/jobs/{job.job_id}/pause")
            assert r.status == 200 and (await r.json())["state"] == "paused"
            r = await client.post(f"/dopsd/jobs/{job.job_id}/resume")
            assert r.status == 200 and (await r.json())["state"] == "running"
            bad = await client.post(f"/dopsd/jobs/{job.job_id}/stop", data="{not json",
                                    headers={"Content-Type": "application/json"})
            assert bad.status == 400
            bad = await client.post(f"/dopsd/jobs/{job.job_id}/stop", json={"save": "yes"})
            assert bad.status == 400
            r = await client.post(f"/dopsd/jobs/{job.job_id}/stop", json={"save": False})
            assert r.status == 200 and (await r.json())["state"] == "stopping"
            await asyncio.get_running_loop().run_in_executor(None, wait_state, job, ("stopped",))
            assert (await client.post(f"/dopsd/jobs/{job.job_id}/stop")).status == 409
            r = await client.get(f"/dopsd/jobs/{job.job_id}")
            body = await r.json()
            assert body["state"] == "stopped" and body["lora_path"] is None and len(body["losses"]) == body["step"]
        finally:
            await client.close()

    asyncio.run(scenario())
