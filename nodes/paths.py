"""Safe user-given paths: names that must stay inside a ComfyUI folder."""
import os


def inside(base: str, relative: str, what: str) -> str:
    """base/relative, refusing absolute paths and anything that escapes `base`."""
    relative = (relative or "").strip()
    if not relative:
        raise ValueError(f"{what} is empty: give a name relative to {base}")
    if os.path.isabs(relative) or relative.startswith(("~", "\\")):
        raise ValueError(f"{what} {relative!r} must be relative to {base}, not an absolute path")
    base_real = os.path.realpath(base)
    path = os.path.realpath(os.path.join(base_real, relative))
    if os.path.commonpath([base_real, path]) != base_real:
        raise ValueError(f"{what} {relative!r} escapes {base}: remove '..' from the name")
    return path
