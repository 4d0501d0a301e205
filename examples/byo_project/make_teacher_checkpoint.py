"""Train DigitNet briefly and save it the way a DDP training script would: ``teacher.pt``,
a plain state dict whose keys all start with ``module.`` (the wrapper's prefix).

    cd examples/byo_project
    python make_teacher_checkpoint.py          # writes teacher.pt (a few seconds)
    python ../../run_pipeline.py --config config.yaml

config.yaml reads it with ``checkpoint: teacher.pt`` and ``strip_prefix: "module."``.
"""

from __future__ import annotations

import sys

import torch
from byo_models import DigitNet
from torch import nn

from kdpipe.config import DataConfig
from kdpipe.data import build_dataset_spec, make_loader


def main(out: str = "teacher.pt", epochs: int = 3) -> None:
    torch.manual_seed(0)
    spec = build_dataset_spec(DataConfig(source="digits", batch_size=64))
    model = DigitNet(spec.num_classes, spec.in_channels, width=16)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    for _ in range(epochs):
        for x, y, _index in make_loader(spec, "train", train=True):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    # What DistributedDataParallel's state_dict() looks like: every key under "module.".
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save(state, out)
    print(f"wrote {out} ({len(state)} tensors, keys like {next(iter(state))!r})")


if __name__ == "__main__":
    main(*sys.argv[1:2])
