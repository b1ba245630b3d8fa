"""Beyond CLIP mapper files (models/bridges/*.safetensors, kind 'beyond_clip_mapper')."""
from dataclasses import dataclass
from pathlib import Path

from ..bridges.mapper import BeyondCLIPMapper, MapperConfig
from . import patcher as patching
from .bridge_files import check_layer_counts, checked_build, load_state_into, read_bridge, save_bridge
from .encode_cache import file_identity
from .errors import LoadError
from .handles import Handle

KIND = "beyond_clip_mapper"


def save_mapper(path, mapper: BeyondCLIPMapper):
    save_bridge(path, KIND, mapper.config.to_dict(), mapper.state_dict())


@dataclass(eq=False)
class LoadedMapper(Handle):
    """A Beyond CLIP mapper under ComfyUI's memory manager, on the text-encoder device beside the LLM."""
    what = "mapper"


def load_mapper(path) -> LoadedMapper:
    config, state_dict = read_bridge(path, KIND)
    try:
        mapper_config = MapperConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise LoadError(f"{path}: its mapper config is not valid ({e}). Write the file again.") from None
    check_layer_counts({"depth": (mapper_config.depth, "tokens.")}, state_dict, path, "mapper")
    # Built on the meta device: the file's tensors become the parameters (no random init, no copy).
    mapper = checked_build(lambda: BeyondCLIPMapper(mapper_config), state_dict, path, "Beyond CLIP mapper")
    load_state_into(mapper, state_dict, path, "Beyond CLIP mapper")
    return host_mapper(mapper.eval().requires_grad_(False), path)


def host_mapper(mapper: BeyondCLIPMapper, path=None) -> LoadedMapper:
    """A mapper module as a handle; from a file (`path`) it carries the file's identity, else none (no caching)."""
    return LoadedMapper(patcher=patching.wrap(mapper), config=mapper.config, source=str(path) if path else "",
                        identity=file_identity(path) if path else "", name=Path(path).name if path else "")
