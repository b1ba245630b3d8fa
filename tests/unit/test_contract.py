"""The conditioning contract and the pack's errors (pure)."""
import subprocess
import sys

import pytest
from conftest import BRIDGES_PACKAGE as PACKAGE
from conftest import PACK_DIR


def test_families_by_width_and_pooled_size(bridges):
    contract = bridges("contract")
    assert contract.family_of(768) is contract.SD1 and contract.family_of(1024) is contract.SD2
    assert contract.family_of(2048, 1280) is contract.SDXL
    assert contract.family_of(2048, 0) is None, "SDXL tokens without the pooled vector are no family"
    assert contract.family_of(4096) is None and contract.label_of_width(4096) == "an unknown model family"
    assert contract.mismatch(768, 0, 768, False) is None and contract.mismatch(2048, 1280, 2048, True) is None
    assert "MODEL expects 2048 (SDXL)" in contract.mismatch(768, 0, 2048, True)
    assert "needs the 1280-wide pooled vector" in contract.mismatch(2048, 0, 2048, True)
    with pytest.raises(ValueError, match="unknown model family"):
        contract.family_by_key("sd3")


def test_pack_errors_show_a_short_name_and_keep_their_python_kind(bridges):
    errors, mumu, llm_text, gill = bridges("errors"), bridges("mumu"), bridges("llm_text"), bridges("gill")
    for cls in (errors.PackError, errors.LoadError, errors.InputError, mumu.PromptError, llm_text.PromptError,
                gill.GILLInputError):
        assert cls.__module__ == "beyond_clip", cls  # ComfyUI shows 'beyond_clip.<Class>', not an install path
    assert issubclass(errors.InputError, ValueError) and issubclass(errors.LoadError, RuntimeError)
    assert issubclass(mumu.PromptError, errors.InputError)


def test_bridges_never_import_comfyui():
    """bridges/ runs without a host: importing every module of it loads nothing of ComfyUI."""
    code = f"""
import importlib, importlib.util, pkgutil, sys
spec = importlib.util.spec_from_file_location({PACKAGE!r}, {str(PACK_DIR / 'bridges' / '__init__.py')!r},
                                              submodule_search_locations=[{str(PACK_DIR / 'bridges')!r}])
package = importlib.util.module_from_spec(spec); sys.modules[{PACKAGE!r}] = package; spec.loader.exec_module(package)
for info in pkgutil.walk_packages(package.__path__, {PACKAGE!r} + "."):
    importlib.import_module(info.name)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("comfy", "folder_paths", "nodes", "execution", "server")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
