"""Workflow files as users share them (the UI format: nodes, links, widgets_values) -> the API format.

Done generically from the host's own node definitions: each node's widget values are matched to its inputs in
the order INPUT_TYPES declares them, as the frontend does. No per-node knowledge lives here.
"""
import json
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
SEED_NAMES = {"seed", "noise_seed"}
MODE_MUTED, MODE_BYPASS = 2, 4


class WorkflowError(ValueError):
    pass


def load_workflow(path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise WorkflowError(f"{path}: no such workflow file") from None
    except ValueError as e:
        raise WorkflowError(f"{path} is not valid JSON ({e})") from None


def is_api_format(workflow: dict) -> bool:
    return "nodes" not in workflow and all(isinstance(v, dict) and "class_type" in v for v in workflow.values())


def _is_widget(spec) -> bool:
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput"):
        return False
    return isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES


def _has_control_widget(name, spec) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return spec[0] == "INT" and (name in SEED_NAMES or bool(opts.get("control_after_generate")))


def _declared_inputs(node_class):
    types = node_class.INPUT_TYPES()
    for section in ("required", "optional"):
        yield from (types.get(section) or {}).items()


def to_api(workflow: dict, node_classes: dict) -> dict:
    """node_classes: class_type -> node class (the host's NODE_CLASS_MAPPINGS)."""
    if is_api_format(workflow):
        return workflow
    nodes = {n["id"]: n for n in workflow.get("nodes", [])}
    links = {link[0]: link for link in workflow.get("links", [])}  # id, from node, from slot, to node, to slot, type
    missing = sorted({n["type"] for n in nodes.values() if n["type"] not in node_classes
                      and n["type"] not in FRONTEND_ONLY})
    if missing:
        raise WorkflowError(f"the workflow uses node types this ComfyUI does not have: {', '.join(missing)}. "
                            f"Install the packs that provide them.")

    def source(link_id):
        """(node id, slot) feeding a link, following reroutes and bypassed nodes; None for primitives."""
        link = links.get(link_id)
        if link is None:
            return None
        node = nodes[link[1]]
        if node["type"] == "Reroute" or node.get("mode") == MODE_BYPASS:
            out_type = link[5]
            for inp in node.get("inputs", []):
                if inp.get("link") is not None and (node["type"] == "Reroute" or inp.get("type") == out_type):
                    return source(inp["link"])
            return None
        if node["type"] == "PrimitiveNode":
            return None  # its value already sits in the target's widgets_values
        return [str(link[1]), link[2]]

    api = {}
    for node_id, node in nodes.items():
        if node["type"] in FRONTEND_ONLY or node.get("mode") in (MODE_MUTED, MODE_BYPASS):
            continue
        linked = {inp["name"]: inp.get("link") for inp in node.get("inputs", [])}
        values = node.get("widgets_values", [])
        inputs = {}
        position = 0
        for name, spec in _declared_inputs(node_classes[node["type"]]):
            value_present = False
            if _is_widget(spec):
                if isinstance(values, dict):
                    value, value_present = values.get(name), name in values
                elif position < len(values):
                    value, value_present = values[position], True
                    position += 1 + int(_has_control_widget(name, spec))
            src = source(linked[name]) if linked.get(name) is not None else None
            if src is not None:
                inputs[name] = src
            elif value_present:
                inputs[name] = value
        api[str(node_id)] = {"class_type": node["type"], "inputs": inputs,
                             "_meta": {"title": node.get("title", node["type"])}}
    return api


def host_at_least(version: str, needed: str) -> bool:
    """Whether a ComfyUI version string ('0.3.64'; the 2024 registry copy has none) is at least `needed`."""
    def parts(v):
        return tuple(int(x) for x in str(v).split(".") if x.isdigit())
    return bool(parts(version)) and parts(version) >= parts(needed)


def host_requirement_reason(workflow: dict) -> str:
    """Why a workflow needs a newer ComfyUI (extra.beyond_clip.requires_comfyui_for)."""
    return ((workflow.get("extra") or {}).get("beyond_clip") or {}).get("requires_comfyui_for", "newer nodes")
