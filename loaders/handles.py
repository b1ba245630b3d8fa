"""What every model socket carries: one kind of handle.

A handle holds the module under ComfyUI's memory manager (a ModelPatcher around it), the module's config, where
it came from and an identity that changes whenever the file, the precision or an applied adapter changes (the
encoding caches key on it; "" means "do not cache"). `module()` is the one way to run it: ComfyUI loads it onto its
device (freeing memory from other models first, applying weight patches) and the module comes back ready.
Loaders share one live handle per (file, settings) while anything holds it (`shared`).
"""
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from . import patcher as patching


@dataclass(eq=False)
class Handle:
    patcher: object  # comfy.model_patcher.ModelPatcher around a patching.HostedModule
    config: object
    source: str = ""  # the file or folder it was read from ("" when built in memory)
    identity: str = ""  # changes with the file, the dtype and applied adapters; "" turns caching off
    name: str = ""
    what = "model"  # what a person calls it, for messages

    @property
    def inner(self) -> torch.nn.Module:
        """The module where it is now (no move onto the device): for reading weights, not for running."""
        return self.patcher.model.inner

    def module(self) -> torch.nn.Module:
        """ComfyUI places the module (with its weight patches) on its load device; returns it ready to run."""
        return patching.load_to_device(self.patcher)

    def describe(self) -> str:
        return f"{self.what} '{self.name or Path(self.source).name or 'built in memory'}'"


def modules(*handles) -> list:
    """Load several handles in one call, so making room for one never unloads another; their modules, in order."""
    return patching.load_all([h.patcher for h in handles])


def hosted(module: torch.nn.Module, load_device=None, offload_device=None, pinned=False):
    """A ModelPatcher for a module (see loaders/patcher.py)."""
    return patching.wrap(module, load_device, offload_device, pinned=pinned)


_LIVE = weakref.WeakValueDictionary()


def shared(key: tuple, build):
    """The live handle for `key` when one exists (a second loader node, or a re-run after the executor dropped its
    cache, gets the same model while anything still holds it), else build() and remember it."""
    live = _LIVE.get(key)
    if live is None:
        live = build()
        _LIVE[key] = live
    return live


def forget_all():
    """Tests: every loader builds again."""
    _LIVE.clear()
