import contextlib

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


def _weight_casts(context) -> int:
    """How many fp32 -> bf16 copies five forward passes of a linear layer make inside `context`."""
    layer = torch.nn.Linear(8, 8)
    with torch.profiler.profile() as profile, context():
        for _ in range(5):
            assert layer(torch.randn(2, 8)).dtype is torch.bfloat16
    return sum(event.count for event in profile.key_averages() if event.key == "aten::_to_copy")


def test_inference_casts_each_weight_once_for_a_run_of_batches():
    once = _weight_casts(lambda: device_module.inference("bf16", "cpu"))
    assert once == 2 + 5  # weight and bias once, the input of every pass

    def inference_mode_autocast():
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        stack.enter_context(device_module.autocast("bf16", "cpu"))
        return stack

    assert _weight_casts(inference_mode_autocast) == 3 * 5  # what it replaces: weight, bias and input every pass


def test_cached_weight_casts_give_the_same_bits():
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(16, 16), torch.randn(4, 16)
    with device_module.inference("bf16", "cpu"):
        cached = [layer(x) for _ in range(2)]
    with torch.inference_mode(), device_module.autocast("bf16", "cpu"):
        fresh = layer(x)
    assert all(torch.equal(out, fresh) for out in cached)
