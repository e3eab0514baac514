import torch

from kgmel_core.retrieval import device as device_module
from kgmel_core.retrieval.device import autocast_dtype


def test_fp32_never_autocasts_and_bf16_always_does():
    assert autocast_dtype("fp32", "cpu") is None
    assert autocast_dtype("bf16", "cpu") is torch.bfloat16


def test_auto_uses_bf16_only_where_the_hardware_has_it(monkeypatch):
    monkeypatch.setattr(device_module, "has_native_bf16", lambda device: False)
    assert autocast_dtype("auto", "cpu") is None
    monkeypatch.setattr(device_module, "has_native_bf16", lambda device: True)
    assert autocast_dtype("auto", "cpu") is torch.bfloat16


def test_resolved_precision_names_what_auto_became(monkeypatch):
    monkeypatch.setattr(device_module, "has_native_bf16", lambda device: False)
    assert device_module.resolved_precision("auto", "cpu") == "fp32"
    assert device_module.resolved_precision("bf16", "cpu") == "bf16"
    monkeypatch.setattr(device_module, "has_native_bf16", lambda device: True)
    assert device_module.resolved_precision("auto", "cpu") == "bf16"


def test_a_cpu_with_amx_or_avx512_bf16_multiplies_bf16_natively(monkeypatch):
    for amx, avx512_bf16, native in [(False, False, False), (True, False, True), (False, True, True)]:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        assert device_module.has_native_bf16("cpu") is native
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert device_module.has_native_bf16("cpu") is False  # a torch without the probes: assume neither
