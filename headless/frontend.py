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

from .host import PACK_DIR, PACK_FOLDER_NAME, HostError, find_comfyui

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")

LOAD_WORKFLOW_JS = """
const workflow = arguments[0];
const done = arguments[arguments.length - 1];
(async () => {
  try {
    await window.app.loadGraphData(workflow);
    const registered = (window.LiteGraph && window.LiteGraph.registered_node_types) || {};
    const nodes = window.app.graph._nodes || window.app.graph.nodes || [];
    done({
      missing: workflow.nodes.map(n => n.type).filter(t => !(t in registered)),
      loaded: nodes.length,
      broken: nodes.filter(n => n.has_errors).map(n => n.type),
    });
  } catch (e) {
    done({error: String((e && e.stack) || e)});
  }
})();
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def input_images_of(workflow: dict):
    """The files a workflow's stock LoadImage nodes read from ComfyUI's input folder."""
    return sorted({n["widgets_values"][0] for n in workflow.get("nodes", [])
                   if n.get("type") in ("LoadImage", "LoadImageMask") and n.get("widgets_values")})


@contextmanager
def comfyui_server(comfyui=None, input_images=(), timeout=300):
    """The real server (main.py) on loopback with the pack in its custom_nodes; yields its URL. Each name in
    input_images is put in its input folder as a small picture, as a user has their own pictures there."""
    from PIL import Image

    root = find_comfyui(comfyui)
    with tempfile.TemporaryDirectory(prefix="beyond-clip-server-") as scratch:
        scratch = Path(scratch)
        (scratch / "input").mkdir()
        for name in input_images:
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
def browser(width=2000, height=1100):
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


def _mark_tutorial_seen(url):
    """The 2025 frontend opens a template gallery for a new user; a returning user does not see it."""
    request = urllib.request.Request(url + "/settings/Comfy.TutorialCompleted", data=b"true", method="POST")
    try:
        urllib.request.urlopen(request, timeout=10).close()
    except OSError:
        pass  # 2024 hosts have no such setting and no gallery


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


def load_in_page(driver, workflow_path, screenshot=None):
    """Load a workflow file in the page; returns {"missing", "loaded", "broken", "console_errors"}."""
    workflow = json.loads(Path(workflow_path).read_text())
    result = driver.execute_async_script(LOAD_WORKFLOW_JS, workflow)
    time.sleep(1)
    result["console_errors"] = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    if screenshot:
        Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(screenshot))
    return result
