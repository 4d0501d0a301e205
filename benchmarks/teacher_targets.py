"""How right and how sure is a saved teacher on the student's training images vs the test split?

Reads a teacher state dict written by recipe_search.py (weights_only) and prints, per split,
accuracy, the mean top probability at T = 1 and the mean probability off the label at T = 4
(the numbers behind docs/recipe.md items 2 and 6):

    PYTHONPATH=src:benchmarks python benchmarks/teacher_targets.py /work/exp/teacher_fashion_mnist_10000_aug_0.pt
"""

from __future__ import annotations

import argparse

import torch
from recipe_search import loaders

from kdpipe.models import create_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("weights")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--arch", default="cnn_large")
    args = p.parse_args()
    spec, ld = loaders(args.dataset, False, args.train_size)
    teacher = create_model(args.arch, spec.num_classes, spec.in_channels)
    teacher.load_state_dict(torch.load(args.weights, weights_only=True))
    teacher.eval()
    for split in ("train", "test"):
        with torch.no_grad():
            pairs = [(teacher(x), y) for x, y, _ in ld[split]]
        logits = torch.cat([p for p, _ in pairs])
        labels = torch.cat([y for _, y in pairs])
        acc = (logits.argmax(1) == labels).float().mean().item()
        top1 = torch.softmax(logits, 1).max(1).values.mean().item()
        off_label = (1 - torch.softmax(logits / 4, 1).gather(1, labels[:, None])).mean().item()
        print(f"{split}: accuracy {acc:.4f}, mean top probability (T=1) {top1:.3f}, "
              f"mass off the label (T=4) {off_label:.3f}")


if __name__ == "__main__":
    main()
