"""Small classifiers: GILL's generate-or-retrieve decision model, and the report shared with the router."""
import torch
import torch.nn.functional as F
from torch import nn

from .data import seeded_init


def train_linear_classifier(features: torch.Tensor, labels: torch.Tensor, classes: int, steps: int = 300,
                            lr: float = 1e-2, seed: int = 0, weight_decay: float = 1e-4, dropout: float = 0.5):
    """GILL's decision model, nn.Sequential(Dropout(0.5), Linear(in, classes)), fitted full-batch with AdamW
    and class-balanced cross-entropy. Returns the module (eval mode)."""
    model = seeded_init(seed, lambda: nn.Sequential(nn.Dropout(dropout), nn.Linear(features.shape[1], classes)))
    counts = torch.bincount(labels, minlength=classes).float().clamp(min=1)
    weight = counts.sum() / (classes * counts)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    # standardised inputs train faster; the scaling is folded back into the Linear at the end
    mean, std = (features.mean(0),
                 features.std(0).clamp(min=1e-6) if len(features) > 1 else torch.ones(features.shape[1]))
    x = (features - mean) / std
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), labels, weight=weight).backward()
            opt.step()
    with torch.no_grad():
        lin = model[1]
        lin.weight.div_(std)
        lin.bias.sub_(lin.weight @ mean)
    return model.eval()


def classification_report(predicted, labels, positive: int = 1) -> dict:
    predicted, labels = torch.as_tensor(predicted), torch.as_tensor(labels)
    tp = int(((predicted == positive) & (labels == positive)).sum())
    fp = int(((predicted == positive) & (labels != positive)).sum())
    fn = int(((predicted != positive) & (labels == positive)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": float((predicted == labels).float().mean()) if len(labels) else 0.0, "f1": f1,
            "precision": precision, "recall": recall, "n": len(labels)}
