"""SEED: pictures -> 32 discrete codes each; codes -> SD1.x conditioning through SEED's de-tokenizer."""
import torch

from ..bridges import seed as seed_bridge
from .cache import reuse_encoding
from .conditioning import conditioning

BATCH = 8  # pictures per vision-tower pass


def tokenize(seed, images, progress=None) -> seed_bridge.SeedCodes:
    """IMAGE batch -> SeedCodes (N, 32). progress() after each batch of BATCH pictures."""
    model = seed.module()
    pixels = seed_bridge.preprocess(images, seed.config.image_size)
    codes = []
    with torch.no_grad():
        for start in range(0, pixels.shape[0], BATCH):
            codes.append(model.encode(pixels[start:start + BATCH]).cpu())
            progress and progress()
    return seed_bridge.SeedCodes(torch.cat(codes), seed.config.codebook_size)


def tokenize_cached(seed, images, *, disk_cache=False, progress=None) -> seed_bridge.SeedCodes:
    codes = reuse_encoding("seed_codes", [seed.identity], [images], lambda: {"codes": tokenize(seed, images,
                                                                                             progress).codes},
                           disk=disk_cache, about={"seed": seed.describe()})["codes"]
    return seed_bridge.SeedCodes(codes, seed.config.codebook_size)


def detokenize(seed, codes: torch.Tensor) -> torch.Tensor:
    """(N, 32) codes -> (N, 77, 768) generation embeddings."""
    seed_bridge.check_codes(codes, seed.config)
    net = seed.module()
    with torch.no_grad():
        return net.decode(codes)


def detokenize_conditioning(seed, codes: torch.Tensor, *, disk_cache=False):
    return reuse_encoding("seed_conditioning", [seed.identity], [codes],
                          lambda: {"positive": conditioning(detokenize(seed, codes))},
                          disk=disk_cache, about={"seed": seed.describe()})["positive"]
