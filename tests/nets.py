"""Small models and helpers the tests of the transform's training paths share."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
from torch import nn


def small_net(channels: int = 8, groups: int = 2) -> nn.Module:
    """Dense, depthwise and grouped 3x3 convs, BN and a classifier: every kind of refocused layer."""
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1, groups=channels), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1, groups=groups), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 5),
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world: int, port: int) -> None:
    """In an ``mp.spawn`` worker: one CPU thread (the ranks share 2 cores), a gloo process group on localhost."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
