"""The one check every picture passes before a model reads it (GILL, SEED, MUMU): a ComfyUI IMAGE is (B, H, W, C)
floats in [0, 1]; a picture that is empty, has a channel count no picture has, or holds NaN or infinite values would
otherwise become a NaN conditioning, a black picture, or lost channels, without a word."""
import torch

from .errors import InputError

CHANNELS = {1: "grey", 2: "grey + alpha", 3: "RGB", 4: "RGBA"}


def check_pixels(images: torch.Tensor, what: str = "the image", error=InputError) -> torch.Tensor:
    """`images` ((B, H, W, C), or one (H, W, C) picture, returned as a batch of one) when every family can read it:
    at least one picture of at least 1x1 pixels, 1 to 4 channels, every value finite. InputError naming `what`
    and the picture otherwise (`error`: an InputError subclass of the caller's). Finite values outside [0, 1] are
    each family's to clamp."""
    if not torch.is_tensor(images):
        raise error(f"{what} is a {type(images).__name__}, not an IMAGE tensor")
    if images.is_complex() or images.dtype == torch.bool:
        raise error(f"{what} holds {images.dtype} values; an IMAGE holds real numbers (0 to 1)")
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise error(f"{what} has shape {tuple(images.shape)}; an IMAGE is (batch, height, width, channels)")
    count, height, width, channels = images.shape
    if count == 0:
        raise error(f"{what} is an empty batch: connect at least one picture")
    if height < 1 or width < 1:
        raise error(f"{what} is {height}x{width} pixels: a picture needs at least one pixel each way. The node "
                         f"that made it (a crop or resize?) produced an empty picture")
    if channels not in CHANNELS:
        raise error(f"{what} has {channels} channels; a picture has 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 "
                         f"(RGBA). Connect a picture (or a mask converted to an image), not another tensor")
    if images.is_floating_point():
        finite = torch.isfinite(images).flatten(1).all(dim=1)
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten().tolist()
            which = f"picture {bad[0] + 1} of {count}" if count > 1 else "the picture"
            raise error(f"{what}: {which} holds NaN or infinite pixel values, which no model can read (the "
                             f"picture would come out as noise). The node that made it produced invalid numbers; "
                             f"check the nodes before it")
    return images
