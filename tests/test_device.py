"""Device resolution and the places that create tensors on the CPU on purpose.

CUDA itself is exercised by tests/test_cuda_*.py (skipped without a GPU); here a fake CUDA
(``torch.cuda.is_available`` / ``device_count`` patched) checks the choices, and CPU-side
state (SR generator, sampling generator, a checkpoint from a node with more GPUs) is checked to be
device-independent.
"""
from __future__ import annotations

import pytest
import torch

from conftest import CONFIGS
from megatron_ufp4.config import ConfigError, load_config
from megatron_ufp4.fp4.sr_random import draw_key
from megatron_ufp4.linear import QuantizedLinear
from megatron_ufp4.parallel.state import process_group_backend
from megatron_ufp4.training.run_setup import local_rank, resolve_device, select_device


@pytest.fixture
def fake_gpus(monkeypatch):
    def install(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    return install


def test_cpu_and_auto_without_cuda(fake_gpus):
    fake_gpus(0)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("auto", local_rank=3) == torch.device("cpu")  # torchrun on a CPU node: gloo, CPU


@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_an_error_not_a_fallback(fake_gpus, name):
    fake_gpus(0)
    with pytest.raises(ValueError, match=f"training.device={name} but no CUDA device is available"):
        resolve_device(name)


def test_auto_and_cuda_take_the_local_rank_gpu(fake_gpus, monkeypatch):
    fake_gpus(8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert resolve_device("auto") == torch.device("cuda", 0)  # single process
    assert resolve_device("auto", local_rank=5) == torch.device("cuda", 5)
    assert resolve_device("cuda", local_rank=7) == torch.device("cuda", 7)
    with pytest.raises(ValueError, match="local rank 8 has no GPU of its own .*has 8"):
        resolve_device("cuda", local_rank=8)


def test_explicit_index(fake_gpus, monkeypatch):
    fake_gpus(2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"cuda:2: this node has 2 GPU\(s\)"):
        resolve_device("cuda:2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun with 2 local ranks: one named GPU cannot serve both
    with pytest.raises(ValueError, match="puts every local rank on one GPU"):
        resolve_device("cuda:1", local_rank=0)


def test_a_chosen_gpu_becomes_the_current_device(fake_gpus, monkeypatch):
    """Triton launches, pinned staging buffers and NCCL use the current device: a process on cuda:1
    must make it current, or it also opens a context (and launches kernels) on GPU 0."""
    fake_gpus(2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
    assert select_device("cuda:1") == torch.device("cuda", 1) and current == [torch.device("cuda", 1)]
    assert select_device("cpu") == torch.device("cpu") and len(current) == 1  # a CPU run touches no GPU


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "mps", ""])
def test_bad_names(name):
    with pytest.raises(ValueError, match="must be auto, cpu, cuda or cuda:N"):
        resolve_device(name)


def test_cli_names_its_flag(fake_gpus):
    fake_gpus(0)
    with pytest.raises(ValueError, match="^--device=cuda but"):
        resolve_device("cuda", field="--device")


def test_config_accepts_an_index_and_rejects_garbage():
    assert load_config(CONFIGS / "tiny_dense.yaml", ["training.device=cuda:3"]).training.device == "cuda:3"
    with pytest.raises(ConfigError, match="training.device: must be auto, cpu, cuda or cuda:N"):
        load_config(CONFIGS / "tiny_dense.yaml", ["training.device=cuda:x"])


def test_local_rank_from_torchrun_env(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert local_rank() is None
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert local_rank() == 3


def test_backend_follows_the_device():
    assert process_group_backend(torch.device("cuda", 1)) == "nccl"
    assert process_group_backend("cpu") == "gloo"


# -- CPU-side state ------------------------------------------------------------------------------
def test_sr_generator_is_cpu_and_its_state_device_independent():
    with torch.device("meta"):  # as the rank build makes modules: the generator still lives on the CPU
        lin = QuantizedLinear(32, 16, recipe="ufp4")
    g = lin.gemms.generator
    assert g.device == torch.device("cpu")
    state = lin.get_extra_state()["sr_generator"]
    assert state.device == torch.device("cpu") and state.dtype == torch.uint8
    assert state.numel() == torch.Generator().get_state().numel()


def test_sr_generator_restores_and_refuses_a_foreign_state():
    a = QuantizedLinear(32, 16, recipe="ufp4", sr_seed=11)
    for _ in range(3):
        draw_key(a.gemms.generator)
    b = QuantizedLinear(32, 16, recipe="ufp4", sr_seed=99)
    b.set_extra_state(a.get_extra_state())
    assert [draw_key(b.gemms.generator) for _ in range(4)] == [draw_key(a.gemms.generator) for _ in range(4)]
    # a CUDA Philox generator state is 16 bytes: not something a CPU generator can continue from
    with pytest.raises(ValueError, match="sr_generator state of 16 bytes is not a CPU generator state"):
        b.set_extra_state({**a.get_extra_state(), "sr_generator": torch.zeros(16, dtype=torch.uint8)})


def test_draw_key_ignores_the_default_device():
    """A key is drawn on its generator's device even under another default device."""
    plain = draw_key(torch.Generator().manual_seed(5))
    with torch.device("meta"):
        assert draw_key(torch.Generator().manual_seed(5)) == plain


def test_sampling_draws_on_the_cpu_generator():
    """generate() samples with a CPU generator from CPU probabilities: same seed, same tokens,
    whatever device the model is on (checked here with a model that returns fixed logits)."""
    from megatron_ufp4.training.inference import generate

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids):
            logits = torch.arange(8, dtype=torch.float32).repeat(*ids.shape, 1)
            return logits + self.w

    out1 = generate(Fixed(), [1], 12, 16, temperature=1.0, top_k=0, generator=torch.Generator().manual_seed(3))
    out2 = generate(Fixed(), [1], 12, 16, temperature=1.0, top_k=0, generator=torch.Generator().manual_seed(3))
    probs = torch.softmax(torch.arange(8, dtype=torch.float32), -1)
    g = torch.Generator().manual_seed(3)
    expect = [int(torch.multinomial(probs[None], 1, generator=g)) for _ in range(12)]
    assert out1 == out2 == expect


def test_a_checkpoint_from_a_node_with_more_gpus_resumes_on_fewer(monkeypatch, tiny_cfg, tmp_path):
    """A checkpoint from a node with more GPUs resumes on one with fewer (this one: none): a
    single-file checkpoint of older versions carries the CUDA RNG states of its 4 GPUs; the run
    resumes with its model, optimizer and step, and no device's RNG state is set from the file
    (the training state is the model -- SR generators included --, the optimizer and the
    counters: no global RNG).  (CUDA cannot be faked here: DCP itself asks torch.cuda.)"""
    from conftest import assert_state_equal, quiet, snapshot, write_legacy_state_file
    from megatron_ufp4.training.trainer import Trainer

    run = ("recipe.name=ufp4", "training.device=cpu", "training.eval_interval=0", "checkpoint.interval=0",
           "checkpoint.save_final=false")
    src = Trainer(tiny_cfg("tiny_dense", tmp_path / "src", *run, "training.train_steps=1"), console=quiet)
    src.train()
    src.close()
    legacy = tmp_path / "elsewhere" / "step_00000001" / "state.pt"
    write_legacy_state_file(src, legacy)
    state = torch.load(legacy, weights_only=True)
    state["rng"]["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]
    torch.save(state, legacy)

    seen = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i=0: seen.append(i))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: seen.append(len(states)))
    dst = Trainer(tiny_cfg("tiny_dense", tmp_path / "dst", *run, "training.train_steps=2", f"training.resume={legacy}"),
                  console=quiet)
    try:
        assert dst.step == 1 and seen == []
        assert_state_equal(snapshot(src.model.state_dict()), snapshot(dst.model.state_dict()), "model")
        assert_state_equal(snapshot(src.optimizer.state_dict()), snapshot(dst.optimizer.state_dict()), "optimizer")
    finally:
        dst.close()


@pytest.mark.parametrize("cli", ["eval", "sample"])
def test_eval_and_sample_refuse_a_missing_gpu_in_one_line(cli, fake_gpus, capsys, tmp_path):
    import importlib
    fake_gpus(0)
    main = importlib.import_module(f"megatron_ufp4.{cli}").main
    assert main([str(tmp_path), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --device=cuda but no CUDA device is available"), err
