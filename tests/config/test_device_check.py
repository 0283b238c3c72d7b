"""A recipe's `device` is checked when the recipe loads (and by `recipe check`): the file, the key,
the value, what is allowed and whether CUDA is available, instead of a torch traceback at generate."""

from __future__ import annotations

import pytest
import torch

from dare_pipeline import Recipe
from dare_pipeline.cli import main
from dare_pipeline.config import ConfigError
from dare_pipeline.config.device import device_problem

ALLOWED = r"allowed: cpu, cuda, cuda:N \(N a GPU index\), mps"


@pytest.mark.parametrize("device, problem", [
    ("gpu", f"not a device torch knows; {ALLOWED}"), ("GPU", "not a device torch knows"),
    ("cuda:x", "not a device torch knows"), ("cuda:-1", "not a device torch knows"), ("", "not a device torch knows"),
    ("cpu,cuda", "not a device torch knows"), ("meta", f"device type 'meta' is not supported; {ALLOWED}"),
    ("xpu", "device type 'xpu' is not supported")])
def test_device_strings_torch_cannot_use(tmp_path, device, problem):
    path = tmp_path / "r.yaml"
    path.write_text(f"device: '{device}'\n")
    with pytest.raises(ConfigError, match=rf"r\.yaml: top level: device = '{device}': {problem}"):
        Recipe.from_yaml(path)


@pytest.mark.parametrize("value", [3, None, ["cpu"]])
def test_device_that_is_not_a_string(value):
    with pytest.raises(ConfigError, match=r"device = .*: expected str"):
        Recipe.from_dict({"device": value})


@pytest.mark.skipif(torch.backends.cuda.is_built(), reason="a CPU-only torch build")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_on_a_cpu_only_torch_build(device, capsys):
    with pytest.raises(ConfigError, match=rf"device = '{device}': this torch build \(.*\) has no CUDA support, so "
                                          r"CUDA is not available; use cpu"):
        Recipe.from_dict({"device": device}, source="r.yaml")
    for command in (["recipe", "check", "recipes/baseline.yaml"],
                    ["generate", "--recipe", "recipes/baseline.yaml", "--prompt-ids", "1,2"]):
        assert main([*command, "--set", f"device={device}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "recipes/baseline.yaml: top level: device = " in err
        assert "has no CUDA support" in err


def test_cuda_build_without_a_visible_gpu(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_problem("cuda") == "CUDA is not available on this machine (no GPU visible to torch); use cpu"
    assert device_problem("cpu") is None


def test_cuda_index_beyond_the_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_problem("cuda:1") is None and device_problem("cuda") is None
    assert device_problem("cuda:2") == "CUDA is available with 2 GPU(s): cuda:0 to cuda:1"


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS is available here")
def test_mps_without_mps():
    with pytest.raises(ConfigError, match="device = 'mps': MPS is not available on this machine"):
        Recipe.from_dict({"device": "mps"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_visible_gpus_are_accepted():
    assert Recipe.from_dict({"device": "cuda"}).device == "cuda"
    assert Recipe.from_dict({"device": f"cuda:{torch.cuda.device_count() - 1}"}).device.startswith("cuda:")
    with pytest.raises(ConfigError, match=f"CUDA is available with {torch.cuda.device_count()} GPU"):
        Recipe.from_dict({"device": f"cuda:{torch.cuda.device_count()}"})


def test_cpu_spellings_are_accepted():
    for device in ("cpu", "cpu:0"):
        assert Recipe.from_dict({"device": device}).device == device
