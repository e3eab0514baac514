"""Make `import open_clip` work beside a CPU-only torch.

torchvision 0.28.0 on PyPI is a CUDA build; next to torch 2.13.0+cpu its C++ extension does not load,
and its import then fails registering a fake kernel for `torchvision::nms`, an op that was never
defined. CLIP needs none of torchvision's C++ ops, only its transforms, so when (and only when) that
import fails we declare the two op schemas torchvision registers unconditionally and import again.
On a matching torch/torchvision pair nothing is touched.
"""

from __future__ import annotations

import sys

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # keep the Library object alive, or the schemas are dropped


def import_torchvision():
    global _library
    try:
        import torchvision
    except RuntimeError as exc:
        if "torchvision::nms does not exist" not in str(exc):
            raise
        import torch

        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _library = torch.library.Library("torchvision", "DEF")
        for schema in _SCHEMAS.values():
            _library.define(schema)
        import torchvision
    return torchvision


def import_open_clip():
    import_torchvision()
    import open_clip

    return open_clip
