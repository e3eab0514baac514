import torch

from kgmel_core.retrieval import device as device_module
from kgmel_core.retrieval.device import training_autocast_dtype


def test_fp32_never_autocasts_and_bf16_always_does():
    assert training_autocast_dtype("fp32", "cpu") is None
    assert training_autocast_dtype("bf16", "cpu") is torch.bfloat16


def test_auto_uses_bf16_only_where_the_hardware_has_it(monkeypatch):
    monkeypatch.setattr(device_module, "has_native_bf16", lambda device: False)
    assert training_autocast_dtype("auto", "cpu") is None
    monkeypatch.setattr(device_module, "has_native_bf16", lambda device: True)
    assert training_autocast_dtype("auto", "cpu") is torch.bfloat16
