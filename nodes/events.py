"""The job contract with the browser, defined once: what the routes serve and what the websocket events carry.

`JobStatus` is the dict `Job.status()` builds, `GET /dopsd/jobs[/{id}]` and the pause/resume/stop routes serve and
the `dopsd.state` event sends; web/dopsd.js reads it. `send` refuses a payload whose keys differ from its event's
type, so the code cannot drift from this module, and docs/architecture.md's "Web contract" lines are
`contract_markdown()` (a test compares them).
"""
from typing import Dict, List, Literal, Optional, TypedDict, get_type_hints

JobState = Literal["waiting", "running", "paused", "stopping", "finished", "stopped", "error"]


class ImageRef(TypedDict):
    """A PNG in ComfyUI's temp folder, viewable at /view?filename=..&subfolder=..&type=.."""
    filename: str
    subfolder: str
    type: str


class Previews(TypedDict):
    """The latest student / teacher samples (same noise) and the step they show."""
    step: int
    student: Optional[ImageRef]
    teacher: Optional[ImageRef]


class RecipeInfo(TypedDict, total=False):
    """The trainer's recipe (dopsd_core/recipes.py) and every setting it resolved to, as the LoRA metadata records
    them (dopsd.recipe, dopsd.recipe_settings); {} for a job built outside the trainer node."""
    recipe: str
    recipe_settings: dict


class JobStatus(TypedDict):
    """One job as the routes serve it. losses: [[step, loss], ...], at most MAX_CHART_POINTS (jobs.py); error: the
    failure or the reason a job stopped itself; warnings: what the user should know that did not stop the job
    (e.g. it resumed a checkpoint trained with other settings), oldest first; checkpoints: paths of the files
    written so far; lora_path: the last LoRA file written under save_prefix; prompt_id: the prompt whose trainer
    node started the job."""
    job_id: str
    node_id: str
    prompt_id: str
    method: str
    state: JobState
    step: int
    total_steps: int
    loss: Optional[float]
    its_per_sec: float
    eta_s: Optional[float]
    losses: List[List[float]]
    error: Optional[str]
    warnings: List[str]
    checkpoints: List[str]
    lora_path: Optional[str]
    previews: Optional[Previews]
    recipe: RecipeInfo


class ProgressEvent(TypedDict):
    """After every optimizer step."""
    job_id: str
    node_id: str
    step: int
    total_steps: int
    loss: float
    its_per_sec: float
    eta_s: float
    state: JobState


class PreviewEvent(TypedDict):
    """Every preview_every steps and at the end, when the job has a VAE."""
    job_id: str
    node_id: str
    step: int
    student: ImageRef
    teacher: ImageRef


EVENTS: Dict[str, type] = {
    "dopsd.progress": ProgressEvent,
    "dopsd.state": JobStatus,      # on every state change; on error `error` holds the message
    "dopsd.preview": PreviewEvent,
}


def fields(kind: type) -> List[str]:
    return list(get_type_hints(kind))


def check(event: str, data: dict):
    """ValueError unless `data` has exactly the keys of `event`'s type."""
    kind = EVENTS.get(event)
    if kind is None:
        raise ValueError(f"unknown D-OPSD event {event!r}; known: {', '.join(EVENTS)}")
    if set(data) != set(fields(kind)):
        raise ValueError(f"{event} payload keys {sorted(data)} differ from {kind.__name__} {fields(kind)}")


def send(event: str, data: dict):
    """Broadcast to every browser tab (thread-safe PromptServer.send_sync); silent when there is no server."""
    check(event, data)
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None:
        server.send_sync(event, data)


def contract_markdown() -> str:
    """The field lists of docs/architecture.md's web contract, written from the types above."""
    def braces(kind):
        return "{" + ", ".join(fields(kind)) + "}"

    lines = [f"JobStatus: `{braces(JobStatus)}`",
             f"Previews: `{braces(Previews)}`; ImageRef: `{braces(ImageRef)}`; "
             f"RecipeInfo: `{braces(RecipeInfo)}`",
             f"state: {', '.join(f'`{s}`' for s in JobState.__args__)}"]
    lines += [f"- `{name}`: `{kind.__name__}` `{braces(kind)}`" for name, kind in EVENTS.items()]
    return "\n".join(lines)
