"""An image index for retrieval: unit embeddings (N, dim) of a folder of images, searched by cosine similarity.

Pure torch. Which models made the embeddings is kept as a fingerprint, so an index is never searched with, or
extended by, embeddings from another vision tower or another retrieval head.
"""
import hashlib
from dataclasses import dataclass, field

import torch


def fingerprint(tensors: dict, samples: int = 4096) -> str:
    """A short content hash of named tensors: names, shapes and up to `samples` evenly spaced values of each
    (cheap even for a 300M-parameter vision tower, and any two different trainings differ in them)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().reshape(-1)
        # rounded to fp16: the same weights loaded in fp16 or fp32 give the same fingerprint
        t = t[:: max(1, t.numel() // samples)].cpu().to(torch.float16).float().contiguous()
        h.update(f"{name}{tuple(tensors[name].shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class ImageIndex:
    name: str
    root: str  # the image folder
    paths: list  # relative to root, one per row of `embeddings`
    embeddings: torch.Tensor  # (N, dim) float32, unit rows
    fingerprint: str  # of the vision tower and the retrieval head that made the rows
    stamps: list = field(default_factory=list)  # (size, mtime_ns) per path, to notice changed files
    skipped: list = field(default_factory=list)  # files that could not be read, with the reason

    def __len__(self):
        return len(self.paths)

    def search(self, query: torch.Tensor, k: int):
        """query: (dim,) unit vector -> (row indices, cosine scores), best first."""
        if len(self) == 0:
            raise ValueError(f"the image index '{self.name}' is empty")
        if query.shape[-1] != self.embeddings.shape[1]:
            raise ValueError(f"the query has {query.shape[-1]} dims but the index '{self.name}' holds "
                             f"{self.embeddings.shape[1]}-dim embeddings")
        scores = self.embeddings @ query.float().reshape(-1).to(self.embeddings.device)
        top = scores.topk(min(k, len(self)))
        return top.indices.tolist(), top.values.tolist()

    def best_score(self, query: torch.Tensor) -> float:
        return self.search(query, 1)[1][0]
