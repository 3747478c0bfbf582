"""HTTP routes for jobs (see docs/architecture.md): list, status, pause, resume, stop. Every answer about a job is
its `events.JobStatus` (Job.status()), the type the `dopsd.state` event carries too."""
import json

from aiohttp import web

from . import jobs


def _job_or_404(request):
    job_id = request.match_info["job_id"]
    job = jobs.JOBS.get(job_id)
    if job is None:
        raise web.HTTPNotFound(text=json.dumps({"error": f"unknown job id {job_id!r}"}), content_type="application/json")
    return job


def _conflict(message):
    return web.json_response({"error": message}, status=409)


async def list_jobs(request):
    return web.json_response({"jobs": [j.status() for j in jobs.all_jobs()]})


async def job_status(request):
    return web.json_response(_job_or_404(request).status())


def _transition(action: str):
    """A route that calls job.<action>() and answers 409 when the job's state does not allow it."""
    async def handler(request):
        job = _job_or_404(request)
        try:
            getattr(job, action)()
        except RuntimeError as e:
            return _conflict(str(e))
        return web.json_response(job.status())
    return handler


pause, resume = _transition("pause"), _transition("resume")


async def stop(request):
    job = _job_or_404(request)
    save = True
    if request.can_read_body:
        try:
            body = await request.json()
        except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes
            return web.json_response({"error": "body must be JSON like {\"save\": true}"}, status=400)
        if not isinstance(body, dict) or not isinstance(body.get("save", True), bool):
            return web.json_response({"error": "body must be a JSON object with a boolean 'save'"}, status=400)
        save = body.get("save", True)
    try:
        job.stop(save=save)
    except RuntimeError as e:
        return _conflict(str(e))
    return web.json_response(job.status())


def register(routes):
    routes.get("/dopsd/jobs")(list_jobs)
    routes.get("/dopsd/jobs/{job_id}")(job_status)
    routes.post("/dopsd/jobs/{job_id}/pause")(pause)
    routes.post("/dopsd/jobs/{job_id}/resume")(resume)
    routes.post("/dopsd/jobs/{job_id}/stop")(stop)


def register_with_server() -> bool:
    try:
        from server import PromptServer
    except ImportError:
        return False
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return False
    register(server.routes)
    return True
