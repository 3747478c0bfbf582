"""Safe user-given paths: names that must stay inside ComfyUI's folders.

Under `--listen` every node input is reachable by a remote client, so a name is (1) relative to the folder
it belongs to, with no '..' that climbs out of it, and (2) after following symlinks, inside one of the
folders allowed for that use. A link that stays inside is followed (e.g. input/ds -> input/shared/ds);
one that leaves is refused. Errors never say whether something outside exists.
"""
import os
from typing import Optional, Sequence

import folder_paths

from ..dopsd_core.data import within


def inside(base: str, relative: str, what: str, roots: Optional[Sequence[str]] = None) -> str:
    """base/relative with symlinks resolved, refusing absolute paths, '..' that climbs out of `base`, and
    links whose target lies outside `roots` (default: `base` itself)."""
    relative = (relative or "").strip()
    if not relative:
        raise ValueError(f"{what} is empty: give a name relative to {base}")
    if os.path.isabs(relative) or relative.startswith(("~", "\\")) or os.path.splitdrive(relative)[0]:
        raise ValueError(f"{what} {relative!r} must be relative to {base}, not an absolute path")
    base_abs = os.path.abspath(base)
    lexical = os.path.normpath(os.path.join(base_abs, relative))
    if os.path.commonpath([base_abs, lexical]) != base_abs:
        raise ValueError(f"{what} {relative!r} escapes {base}: remove '..' from the name")
    roots = list(roots) if roots else [base]
    if not within(lexical, roots):
        raise ValueError(f"{what} {relative!r} is a link to a place outside {' and '.join(roots)}: ComfyUI only "
                         "reads and writes inside its own folders; move or copy the files there")
    return os.path.realpath(lexical)


def comfy_roots(*kinds: str) -> list:
    """ComfyUI's folders by kind: 'input', 'output', 'temp', or a models folder name such as 'loras'."""
    out = []
    for kind in kinds:
        if kind == "input":
            out.append(folder_paths.get_input_directory())
        elif kind == "output":
            out.append(folder_paths.get_output_directory())
        elif kind == "temp":
            out.append(folder_paths.get_temp_directory())
        else:
            out.extend(folder_paths.get_folder_paths(kind))
    return out


def resume_path(resume_from: str) -> str:
    """The training state `resume_from` names: a job id or '<job id>/training_state.pt' under
    output/dopsd_jobs, or a path inside output/dopsd_jobs or input (absolute or relative). A job folder
    means its training_state.pt. '' means no resume. Anything else, existing or not, gets one message."""
    resume_from = (resume_from or "").strip()
    if not resume_from:
        return ""
    jobs_dir = os.path.join(folder_paths.get_output_directory(), "dopsd_jobs")
    roots = [jobs_dir, folder_paths.get_input_directory()]
    refused = ValueError(f"resume_from {resume_from!r} is not a training state in output/dopsd_jobs or input: give "
                         "the job id (or '<job id>/training_state.pt') of a job in output/dopsd_jobs")
    if os.path.isabs(resume_from):
        candidates = [resume_from] if within(resume_from, roots) else []
    else:
        candidates = []
        for base in roots:
            try:
                candidates.append(inside(base, resume_from, "resume_from", roots))
            except ValueError:
                pass
    for path in candidates:
        path = os.path.realpath(path)
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "training_state.pt")):
            return os.path.join(path, "training_state.pt")
        if os.path.isfile(path):
            return path
    raise refused
