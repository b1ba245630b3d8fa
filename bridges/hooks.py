"""Running a model with hooks on named submodules, the one way the pack attaches adapters and LoRAs beside a
frozen model: the model's modules and weights are untouched, and the hooks go when the block ends, also when it
raises."""
from contextlib import contextmanager


@contextmanager
def attached(model, hooks: dict, kind: str = "forward"):
    """Run `model` with hooks[path] on the submodule at each path: kind "forward" (fn(module, args, output) ->
    output) or "pre" (fn(module, args) -> args)."""
    if kind not in ("forward", "pre"):
        raise ValueError(f"unknown hook kind {kind!r}")
    handles = []
    try:
        for path, fn in hooks.items():
            module = model.get_submodule(path)
            handles.append(module.register_forward_hook(fn) if kind == "forward" else
                           module.register_forward_pre_hook(fn))
        yield model
    finally:
        for handle in handles:
            handle.remove()
