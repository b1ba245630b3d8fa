"""The real ComfyUI frontend, served by the real server, in headless Chromium: load workflow files the way a
user does and see what the page says (missing node types, errors) and shows (a screenshot).

Needs Debian's chromium and chromium-driver and the selenium package. Used by the tests and by
`python -m headless screenshots`. This file imports nothing from the pack (like host.py).
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from . import examples
from .host import PACK_DIR, PACK_FOLDER_NAME, HostError, find_comfyui, registry_copy_dir

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")

LOAD_WORKFLOW_JS = """
const workflow = arguments[0];
const name = arguments[1];
const done = arguments[arguments.length - 1];
(async () => {
  try {
    // 2025 frontends open the graph in a tab named after the file (older ones ignore the name)
    await window.app.loadGraphData(workflow, true, false, name);
    const manager = window.app.extensionManager;
    const store = manager && manager.workflow;
    if (store && store.openWorkflows && store.closeWorkflow) {  // one tab: close the others (never modified here)
      for (const other of [...store.openWorkflows]) {
        if (other !== store.activeWorkflow) await store.closeWorkflow(other);
      }
    }
    const registered = (window.LiteGraph && window.LiteGraph.registered_node_types) || {};
    const nodes = window.app.graph._nodes || window.app.graph.nodes || [];
    done({
      missing: workflow.nodes.map(n => n.type).filter(t => !(t in registered)),
      loaded: nodes.length,
      broken: nodes.filter(n => n.has_errors).map(n => n.type),
      tabs: store && store.openWorkflows ? store.openWorkflows.map(w => w.filename) : null,
    });
  } catch (e) {
    done({error: String((e && e.stack) || e)});
  }
})();
"""

FIT_GRAPH_JS = """
// The whole graph in view, inside the part of the canvas that the menus and toolbars leave free.
const canvas = window.app.canvas;
const nodes = window.app.graph._nodes || window.app.graph.nodes || [];
if (!canvas || !canvas.ds || !nodes.length) return;
const title = (window.LiteGraph && window.LiteGraph.NODE_TITLE_HEIGHT) || 30;
let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
for (const n of nodes) {
  x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - title);
  x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
}
const el = canvas.canvas, ratio = window.devicePixelRatio || 1;
const free = {left: 80, top: 100, right: el.width / ratio - 30, bottom: el.height / ratio - 70};
const w = free.right - free.left, h = free.bottom - free.top;
const scale = Math.min(w / (x1 - x0), h / (y1 - y0), 1.2);
canvas.ds.scale = scale;
canvas.ds.offset[0] = (free.left + w / 2) / scale - (x0 + x1) / 2;
canvas.ds.offset[1] = (free.top + h / 2) / scale - (y0 + y1) / 2;
canvas.setDirty(true, true);
"""

# Whether every picture of the graph's Load Image nodes has arrived (previews are fetched after the load, and the
# nodes grow to show them), and the nodes' sizes now.
LAYOUT_JS = """
const nodes = window.app.graph._nodes || window.app.graph.nodes || [];
const shown = nodes.filter(n => n.type === 'LoadImage')
                   .every(n => n.imgs && n.imgs.length && n.imgs.every(i => i.complete && i.naturalWidth > 0));
return [shown, nodes.map(n => [n.pos[0], n.pos[1], n.size[0], n.size[1]])];
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def input_images_of(workflow: dict):
    """The files a workflow reads from ComfyUI's input folder: its LoadImage pictures, and the pack's example
    inputs (caption files, picture folders) its widgets name."""
    names = {n["widgets_values"][0] for n in workflow.get("nodes", [])
             if n.get("type") in ("LoadImage", "LoadImageMask") and n.get("widgets_values")}
    names |= {v.rstrip("/") for n in workflow.get("nodes", []) for v in (n.get("widgets_values") or [])
              if examples.example_path(v) is not None}
    return sorted(names)


@contextmanager
def comfyui_server(comfyui=None, input_images=(), timeout=300):
    """The real server (main.py) on loopback with the pack in its custom_nodes; yields its URL. Each name in
    input_images is put in its input folder, as a user has their own pictures there: the pack's example of that
    name (data/examples/), else a small plain picture."""
    from PIL import Image

    root = find_comfyui(comfyui)
    with tempfile.TemporaryDirectory(prefix="beyond-clip-server-") as scratch:
        scratch = Path(scratch)
        (scratch / "input").mkdir()
        shipped = [name for name in input_images if examples.example_path(name) is not None]
        examples.place({"inputs": {"inputs": {str(i): name for i, name in enumerate(shipped)}}}, scratch / "input")
        for name in input_images:
            if name not in shipped:
                Image.new("RGB", (64, 64), (90, 140, 200)).save(scratch / "input" / name)
        port = _free_port()
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--disable-auto-launch", "--output-directory", str(scratch / "output"),
               "--temp-directory", str(scratch / "temp"), "--input-directory", str(scratch / "input")]
        help_text = (root / "comfy" / "cli_args.py").read_text()
        if "--base-directory" in help_text:
            # 2025 hosts: custom_nodes, models and user data under a scratch base, the user's folder untouched
            (scratch / "custom_nodes").mkdir()
            (scratch / "custom_nodes" / PACK_FOLDER_NAME).symlink_to(PACK_DIR, target_is_directory=True)
            cmd += ["--base-directory", str(scratch)]
        else:
            # 2024 hosts read custom_nodes/ beside main.py only: link the pack there (the registry copy lives
            # in our cache; a user's own ComfyUI already has the pack installed there)
            link = root / "custom_nodes" / PACK_FOLDER_NAME
            if link.is_symlink() and link.resolve() != PACK_DIR and root == registry_copy_dir().resolve():
                link.unlink()  # our cache's link to another checkout of the pack: this one is served
            if not link.exists() and not any(p.resolve() == PACK_DIR for p in (root / "custom_nodes").iterdir()):
                link.symlink_to(PACK_DIR, target_is_directory=True)
        log_path = scratch / "server.log"
        with open(log_path, "w") as log:
            server = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT)
            url = f"http://127.0.0.1:{port}"
            try:
                deadline = time.monotonic() + timeout
                while True:
                    if server.poll() is not None:
                        raise HostError(f"the ComfyUI server exited early:\n{log_path.read_text()[-3000:]}")
                    try:
                        with urllib.request.urlopen(url + "/object_info", timeout=5) as r:
                            if r.status == 200:
                                break
                    except OSError:
                        pass
                    if time.monotonic() > deadline:
                        raise HostError(f"the ComfyUI server did not answer in {timeout} s:\n"
                                        f"{log_path.read_text()[-3000:]}")
                    time.sleep(1)
                yield url, log_path
            finally:
                server.terminate()
                try:
                    server.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    server.kill()


@contextmanager
def browser(width=2000, height=1300):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    with tempfile.TemporaryDirectory(prefix="beyond-clip-chromium-") as profile:
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-quic", "--no-first-run", f"--user-data-dir={profile}",
                     f"--window-size={width},{height}"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            driver.set_script_timeout(120)
            yield driver
        finally:
            driver.quit()


# Settings of a returning user: no template gallery (2025 frontends open it for a new user), no minimap over the
# graph. 2024 hosts have no such settings and ignore them.
SETTINGS = {"Comfy.TutorialCompleted": b"true", "Comfy.Minimap.Visible": b"false",
            "LiteGraph.Canvas.MinFontSizeForLOD": b"1"}  # and the node text drawn at any zoom


def _mark_tutorial_seen(url):
    for key, value in SETTINGS.items():
        request = urllib.request.Request(f"{url}/settings/{key}", data=value, method="POST")
        try:
            urllib.request.urlopen(request, timeout=10).close()
        except OSError:
            pass


def open_app(driver, url, timeout=120):
    _mark_tutorial_seen(url)
    driver.get(url)
    deadline = time.monotonic() + timeout
    while not driver.execute_script("return !!(window.app && window.app.graph && window.LiteGraph)"):
        if time.monotonic() > deadline:
            raise HostError(f"the ComfyUI page at {url} did not start in {timeout} s")
        time.sleep(0.5)
    time.sleep(1)  # let extensions finish registering
    driver.get_log("browser")  # start each workflow with an empty console


# The pictures the Load Image nodes show: [file name, width, height] each.
PICTURES_JS = """
const nodes = window.app.graph._nodes || window.app.graph.nodes || [];
return nodes.filter(n => n.type === 'LoadImage').map(n => [
  String(n.widgets && n.widgets[0] && n.widgets[0].value),
  n.imgs && n.imgs[0] ? n.imgs[0].naturalWidth : 0, n.imgs && n.imgs[0] ? n.imgs[0].naturalHeight : 0]);
"""


def _settled_layout(driver, timeout=30):
    """The nodes' places and sizes once the pictures are in and nothing has moved for a second."""
    deadline, last, steady = time.monotonic() + timeout, None, 0
    while steady < 4 and time.monotonic() < deadline:
        time.sleep(0.25)
        shown, layout = driver.execute_script(LAYOUT_JS)
        steady = steady + 1 if shown and layout == last else 0
        last = layout
    return last


def load_in_page(driver, workflow_path, screenshot=None):
    """Load a workflow file in the page, in one tab named after the file with the whole graph in view; returns
    {"missing", "loaded", "broken", "tabs", "pictures", "console_errors"}."""
    workflow = json.loads(Path(workflow_path).read_text())
    result = driver.execute_async_script(LOAD_WORKFLOW_JS, workflow, Path(workflow_path).stem)
    # Nodes grow when they are first drawn (Load Image to show its picture), and only nodes in view are drawn:
    # fit, let the layout settle, and fit again until the fitted layout is the settled one.
    fitted = None
    for _ in range(5):
        layout = _settled_layout(driver)
        if layout == fitted:
            break
        driver.execute_script(FIT_GRAPH_JS)
        fitted = layout
    time.sleep(1)  # the next frames
    result["pictures"] = driver.execute_script(PICTURES_JS)
    result["console_errors"] = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    if screenshot:
        Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(screenshot))
    return result
