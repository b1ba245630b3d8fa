"""Beyond CLIP mapper files (models/bridges/*.safetensors, kind 'beyond_clip_mapper')."""
import torch

from ..bridges.mapper import BeyondCLIPMapper, MapperConfig
from .bridge_files import load_state_into, read_bridge, save_bridge
from .encode_cache import file_identity
from .errors import LoadError

KIND = "beyond_clip_mapper"


def save_mapper(path, mapper: BeyondCLIPMapper):
    save_bridge(path, KIND, mapper.config.to_dict(), mapper.state_dict())


def load_mapper(path) -> BeyondCLIPMapper:
    config, state_dict = read_bridge(path, KIND)
    try:
        with torch.device("meta"):  # the file's tensors become the parameters: no random init, no copy
            mapper = BeyondCLIPMapper(MapperConfig.from_dict(config))
    except (TypeError, ValueError) as e:
        raise LoadError(f"{path}: its mapper config is not valid ({e}). Write the file again.") from None
    load_state_into(mapper, state_dict, path, "Beyond CLIP mapper")
    mapper.source = str(path)
    mapper.identity = file_identity(path)
    return mapper.eval().requires_grad_(False)
