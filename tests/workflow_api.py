"""UI-format workflows (what the ComfyUI frontend saves and drag-and-drop loads) -> API-format prompts.

The frontend does this conversion itself when it queues a prompt (`app.graphToPrompt()`). The tests need it
without a browser, so this module reimplements the parts the shipped workflows use, from `/object_info`:

- widget values: `widgets_values` lists one value per widget input, in the node definition's input order
  (`input_order`: required, then optional), plus the extra values the frontend keeps for its own widgets:
  `control_after_generate` after an INT named seed / noise_seed or flagged `control_after_generate`,
  and the upload button value after an `image_upload` / `video_upload` / `audio_upload` combo;
- links, including widget inputs converted to sockets (a linked input wins over its widget value);
- frontend-only nodes are dropped (Note, MarkdownNote), Reroute nodes are followed to their source,
  PrimitiveNode values are copied into the inputs they feed, muted nodes (mode 2) are dropped and bypassed
  nodes (mode 4) pass their first input of the requested type through.
`browser` tests check that this matches the frontend's own `graphToPrompt()` for every shipped workflow.
"""
import json
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
CONTROL = "__control_after_generate__"
UPLOAD = "__upload__"
MODE_MUTED, MODE_BYPASS = 2, 4


class WorkflowError(ValueError):
    pass


def load(path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def input_specs(node_info: dict):
    """[(name, type, options, section)] in the order the frontend creates widgets and sockets."""
    inputs = node_info.get("input", {})
    order = node_info.get("input_order") or {}
    specs = []
    for section in ("required", "optional"):
        spec = inputs.get(section) or {}
        for name in order.get(section) or list(spec):
            if name in spec:
                entry = spec[name]
                type_ = entry[0]
                opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
                specs.append((name, type_, opts, section))
    return specs


def is_widget(type_, opts) -> bool:
    if opts.get("forceInput"):
        return False
    return isinstance(type_, list) or type_ in WIDGET_TYPES


def input_type(type_) -> str:
    """The socket type of an input spec: combos are COMBO."""
    return "COMBO" if isinstance(type_, list) else type_


def widget_layout(node_info: dict) -> list:
    """Names of the values in a node's `widgets_values`, in order (CONTROL / UPLOAD for frontend extras)."""
    names = []
    for name, type_, opts, _ in input_specs(node_info):
        if not is_widget(type_, opts):
            continue
        names.append(name)
        if type_ == "INT" and opts.get("control_after_generate", name in ("seed", "noise_seed")):
            names.append(CONTROL)
        elif input_type(type_) == "COMBO" and opts.get("control_after_generate"):
            names.extend([CONTROL, CONTROL + "_filter"])
        if any(opts.get(flag) for flag in UPLOAD_FLAGS):
            names.append(UPLOAD)
    return names


def widget_values(node: dict, node_info: dict) -> dict:
    """{input name: value} from a UI node's widgets_values."""
    values = node.get("widgets_values")
    if values is None:
        return {}
    if isinstance(values, dict):  # some nodes save a name -> value map
        return dict(values)
    layout = widget_layout(node_info)
    if len(values) != len(layout):
        raise WorkflowError(f"node {node['id']} ({node['type']}): {len(values)} widget values for "
                            f"{len(layout)} widgets {layout}; is the workflow from another version of the node?")
    return {name: value for name, value in zip(layout, values) if name not in (CONTROL, CONTROL + "_filter", UPLOAD)}


def _links(workflow: dict) -> dict:
    """link id -> (origin_id, origin_slot, target_id, target_slot, type)."""
    out = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            out[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                               link.get("type"))
        else:
            lid, oid, oslot, tid, tslot, type_ = link[:6]
            out[lid] = (oid, oslot, tid, tslot, type_)
    return out


def to_api(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt {node_id: {class_type, inputs, _meta}} the frontend would queue."""
    if workflow.get("definitions", {}).get("subgraphs"):
        raise WorkflowError("workflows with subgraphs are not supported by this converter")
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = _links(workflow)

    def resolve(link_id, depth=0):
        """(origin node id, slot) of a link, through Reroute and bypassed nodes; or ('value', v) for primitives."""
        if depth > 50:
            raise WorkflowError("link cycle through Reroute/bypassed nodes")
        origin_id, origin_slot, _, _, type_ = links[link_id]
        origin = nodes[origin_id]
        if origin["type"] == "Reroute":
            upstream = origin["inputs"][0].get("link")
            return None if upstream is None else resolve(upstream, depth + 1)
        if origin["type"] == "PrimitiveNode":
            return ("value", (origin.get("widgets_values") or [None])[0])
        if origin.get("mode") == MODE_BYPASS:
            for slot in origin.get("inputs", []):
                if slot.get("link") is not None and slot.get("type") == type_:
                    return resolve(slot["link"], depth + 1)
            return None
        if origin.get("mode") == MODE_MUTED:
            return None
        return (str(origin_id), origin_slot)

    prompt = {}
    for node_id, node in nodes.items():
        type_ = node["type"]
        if type_ in FRONTEND_ONLY or node.get("mode") in (MODE_MUTED, MODE_BYPASS):
            continue
        info = object_info.get(type_)
        if info is None:
            raise WorkflowError(f"node {node_id}: type {type_!r} is not in /object_info (missing custom node?)")
        inputs = widget_values(node, info)
        for slot in node.get("inputs", []):
            if slot.get("link") is None:
                continue
            source = resolve(slot["link"])
            if source is None:
                continue
            if source[0] == "value":
                inputs[slot["name"]] = source[1]
            else:
                inputs[slot["name"]] = [source[0], source[1]]
        for name, value in list(inputs.items()):
            if isinstance(value, list) and not (len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)):
                inputs[name] = {"__value__": value}  # what the frontend does with list-valued widgets
        prompt[str(node_id)] = {"class_type": type_, "inputs": inputs, "_meta": {"title": node.get("title") or type_}}
    return prompt


def link_type_problems(workflow: dict, object_info: dict) -> list:
    """Links whose declared type does not match the source output type and the target input type."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    problems = []
    for lid, (oid, oslot, tid, tslot, type_) in _links(workflow).items():
        origin, target = nodes.get(oid), nodes.get(tid)
        if origin is None or target is None:
            problems.append(f"link {lid}: endpoint node missing ({oid} -> {tid})")
            continue
        out_type = in_type = None
        if origin["type"] in object_info:
            outs = object_info[origin["type"]]["output"]
            out_type = "COMBO" if isinstance(outs[oslot], list) else outs[oslot]
        if target["type"] in object_info:
            slot = target["inputs"][tslot]
            specs = {name: input_type(t) for name, t, _, _ in input_specs(object_info[target["type"]])}
            if slot["name"] not in specs:
                problems.append(f"link {lid}: {target['type']} has no input {slot['name']!r}")
                continue
            in_type = specs[slot["name"]]
        for where, expected in (("source output", out_type), ("target input", in_type)):
            if expected is not None and not _types_match(type_, expected):
                problems.append(f"link {lid} ({origin['type']}[{oslot}] -> {target['type']}.{target['inputs'][tslot]['name']}):"
                                f" link type {type_!r} != {where} type {expected!r}")
        if out_type is not None and in_type is not None and not _types_match(out_type, in_type):
            problems.append(f"link {lid}: {origin['type']} outputs {out_type!r} but {target['type']} expects {in_type!r}")
    return problems


def _types_match(a, b) -> bool:
    if a == "*" or b == "*":
        return True
    sa, sb = set(str(a).split(",")), set(str(b).split(","))
    return bool(sa & sb)


def swap_values(prompt: dict, replacements: dict) -> dict:
    """A copy of an API prompt with widget values replaced: {(class_type, input): value} or
    {(class_type, input, old_value): value}."""
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        for name, value in list(node["inputs"].items()):
            for key in ((node["class_type"], name, value if not isinstance(value, (list, dict)) else None),
                        (node["class_type"], name)):
                if key in replacements:
                    node["inputs"][name] = replacements[key]
                    break
    return out
