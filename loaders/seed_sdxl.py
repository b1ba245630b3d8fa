"""SEED de-tokenizer heads for SDXL (models/bridges/*.safetensors, kind 'seed_sdxl_head'): the head's config and the
SEED tokenizer it was trained on (name and fingerprint: its input is that tokenizer's de-tokenizer output)."""
from dataclasses import dataclass
from pathlib import Path

import torch

from ..bridges.seed_sdxl import SeedSDXLHead, SeedSDXLHeadConfig
from . import patcher as patching
from .bridge_files import load_state_into, read_bridge, save_bridge
from .encode_cache import file_identity
from .errors import LoadError
from .handles import Handle

KIND = "seed_sdxl_head"


def save_head(path, head: SeedSDXLHead, seed_id: dict):
    save_bridge(path, KIND, {"head": head.config.to_dict(), "seed": seed_id}, head.state_dict())


@dataclass(eq=False)
class LoadedSeedSDXLHead(Handle):
    """config: SeedSDXLHeadConfig; seed: how the file names the SEED tokenizer it was trained on."""
    seed: dict = None
    what = "SEED SDXL head"


def load_head(path) -> LoadedSeedSDXLHead:
    path = Path(path)
    config, state = read_bridge(path, KIND)
    try:
        head_config = SeedSDXLHeadConfig.from_dict(config["head"])
        seed_id = dict(config["seed"])
        with torch.device("meta"):
            head = SeedSDXLHead(head_config)
    except (KeyError, TypeError, ValueError) as e:
        raise LoadError(f"{path}: its SEED SDXL head config is not valid ({type(e).__name__}: {e}). Train it "
                        f"again.") from None
    load_state_into(head, state, path, "SEED SDXL head")
    return LoadedSeedSDXLHead(patcher=patching.wrap(head.eval().requires_grad_(False)), config=head_config,
                              source=str(path), identity=file_identity(path), name=path.name, seed=seed_id)


def check_head_fits(head: LoadedSeedSDXLHead, seed, seed_id: dict):
    """The head reads the de-tokenizer output of the SEED tokenizer it was trained on; another one is refused."""
    if head.seed.get("fingerprint") != seed_id["fingerprint"]:
        raise LoadError(f"{head.describe()} was trained on the SEED tokenizer '{head.seed.get('name')}'; the connected "
                        f"one ('{seed_id['name']}') is another. Load '{head.seed.get('name')}', or train a head for "
                        f"this tokenizer.")
    if head.config.in_dim != seed.config.out_dim:
        raise LoadError(f"{head.describe()} reads {head.config.in_dim}-wide SEED embeddings; {seed.describe()} makes "
                        f"{seed.config.out_dim}.")
