"""Every shipped workflow loads in the real ComfyUI frontend (served by the real server, in headless Chromium)
with no missing node types and no errors in the page; a screenshot of each graph is taken."""
import json
import os
import shutil

import pytest
from conftest import PACK_DIR, pack_module
from PIL import Image

WORKFLOWS = sorted((PACK_DIR / "workflows").glob("*.json"))


def _browser_missing():
    missing = [tool for tool in ("chromium", "chromedriver") if shutil.which(tool) is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium")
    return missing


@pytest.fixture(scope="module")
def page(pack):
    missing = _browser_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the frontend test; missing: {missing} (scripts/setup_env.sh installs them)")
        pytest.skip(f"needs {missing}: apt-get install chromium chromium-driver; pip install selenium")
    frontend = pack_module(pack, "headless.frontend")
    inputs = sorted({name for w in WORKFLOWS for name in frontend.input_images_of(json.loads(w.read_text()))})
    with frontend.comfyui_server(input_images=inputs) as (url, log), frontend.browser() as driver:
        frontend.open_app(driver, url)
        yield frontend, driver, log


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[w.name for w in WORKFLOWS])
def test_workflow_loads_in_the_real_frontend(page, workflow, tmp_path):
    frontend, driver, log = page
    shot = tmp_path / f"{workflow.stem}.png"
    result = frontend.load_in_page(driver, workflow, screenshot=shot)
    assert "error" not in result, result["error"]
    assert result["missing"] == [], f"node types the frontend does not know: {result['missing']}"
    assert result["broken"] == []
    assert result["console_errors"] == [], result["console_errors"]
    assert result["loaded"] == len(json.loads(workflow.read_text())["nodes"])
    # 2025 frontends: one tab, named after the file (2024 ones have no tabs)
    assert result["tabs"] in (None, [workflow.stem]), result["tabs"]
    # each Load Image node shows the pack's example picture of its name (data/examples/)
    for name, width, height in result["pictures"]:
        with Image.open(frontend.examples.EXAMPLES_DIR / name) as shipped:
            assert (width, height) == shipped.size, f"Load Image {name} shows a {width}x{height} picture"
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a drawn graph, not a blank page


def test_readme_node_table_matches_the_node_definitions(pack):
    docs = pack_module(pack, "headless.docs")
    readme = (PACK_DIR / "README.md").read_text()
    table = docs.node_table(pack.NODE_CLASS_MAPPINGS, pack.NODE_DISPLAY_NAME_MAPPINGS)
    assert docs.replace_table(readme, table) == readme, "README's node table is stale: run `python -m headless docs`"


def test_readme_shows_every_workflow():
    readme = (PACK_DIR / "README.md").read_text()
    for workflow in WORKFLOWS:
        assert f"workflows/{workflow.name}" in readme
        assert (PACK_DIR / "docs" / "images" / f"{workflow.stem}.png").is_file(), \
            f"no screenshot for {workflow.name}: run `python -m headless screenshots`"
