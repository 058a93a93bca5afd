"""The GPU path on a real CUDA device: flash attention, bf16 training steps, the sweep and the
Hessians against the CPU, device slots. Skipped where no CUDA device is visible (CI has none)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from pgolf.model.gpt import GPT, GPTConfig
from pgolf.quant.gptq import GPTQConfig
from pgolf.quant.hessian import collect_hessians
from pgolf.quant.sweep import Subset, SweepConfig, prefix_cache, sweep_matrix, window_nlls
from pgolf.train.distributed import Dist
from pgolf.train.trainer import TrainConfig, build_run, set_schedule, train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
# head_dim 64 and GQA (4 query heads over 2 KV heads), as the record stack
CONFIG = dict(vocab_size=256, num_layers=3, model_dim=256, num_heads=4, num_kv_heads=2,
              loop_start=1, loop_end=1, num_loops=1, skip_gates=True, xsa_last_n=1)


def model(device) -> GPT:
    torch.manual_seed(0)
    m = GPT(GPTConfig(**CONFIG))
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2:
                p.add_(torch.randn_like(p) * 0.05)
    m.looping = True
    return m.to(device).eval()


def test_flash_attention_serves_the_model_under_bf16():
    m = model(CUDA)
    x, y = (torch.randint(0, 256, (4, 512), device=CUDA) for _ in range(2))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if flash cannot serve it
            flash = float(m(x, y))
        with sdpa_kernel([SDPBackend.MATH]):
            math = float(m(x, y))
    assert abs(flash - math) < 2e-2 * abs(math)


class RepeatedBatch:
    """One fixed batch, drawn again and again: a few steps must overfit it."""

    def __init__(self, seq_len: int):
        self.batch = np.random.default_rng(0).integers(0, 256, size=(64, seq_len + 1))

    def draw(self, rows: int, progress: float) -> np.ndarray:
        return self.batch[:rows]


@pytest.mark.parametrize("compiled", [False, True])
def test_bf16_training_steps_lower_the_loss(compiled):
    cfg = TrainConfig(seq_len=128, batch_tokens=128 * 16, steps=30, device="cuda",
                      compile=compiled, ema_decay=0.0, loop_enable_at=0.5,
                      loader={"streams": 1})
    run = build_run(GPTConfig(**CONFIG), cfg, dist=Dist(0, 1, 0, CUDA),
                    streams=[RepeatedBatch(cfg.seq_len)], seed=0)
    losses = []
    for step in range(cfg.steps):
        frac = step / cfg.steps
        set_schedule(run, frac)
        losses.append(train_step(run, frac))
    assert all(np.isfinite(losses)) and np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_the_sweep_on_cuda_matches_the_cpu():
    rows = {}
    batches = [(torch.randint(0, 256, (4, 64)), torch.randint(0, 256, (4, 64))) for _ in range(2)]
    torch.manual_seed(1)
    H = (lambda X: X.T @ X / len(X))(torch.randn(1024, 256))
    for device in ("cpu", "cuda"):
        m = model(device)
        subset = Subset([(x.to(device), y.to(device)) for x, y in batches], 2000)
        base = window_nlls(m, prefix_cache(m, subset, 0), 0)
        rows[device] = sweep_matrix(m, "blocks.1.mlp.fc.weight", H.to(device), subset, base,
                                    cfg=SweepConfig(bits=[4, 8]), gptq=GPTQConfig())
    for cpu, gpu in zip(rows["cpu"], rows["cuda"], strict=True):
        assert abs(cpu["dbpb"] - gpu["dbpb"]) <= 1e-3 * abs(cpu["dbpb"]) + 1e-6
        assert abs(cpu["bytes"] - gpu["bytes"]) <= 0.01 * cpu["bytes"]


def test_bf16_hessians_on_cuda_match_fp32_on_the_cpu():
    batches = [torch.randint(0, 256, (4, 128)) for _ in range(2)]
    cpu = collect_hessians(model("cpu"), batches)
    gpu = collect_hessians(model(CUDA), [x.to(CUDA) for x in batches], autocast=True)
    for name, (H, n) in cpu.items():
        assert gpu[name][1] == n
        assert torch.linalg.norm(gpu[name][0] - H) <= 3e-2 * torch.linalg.norm(H), name


def test_a_slot_job_sees_only_its_device(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID")}
    probe = "import os, torch; print(os.environ['CUDA_VISIBLE_DEVICES'], torch.cuda.device_count())"
    out = subprocess.run([sys.executable, "-m", "pgolf.gpuslots", "--gpus", "1", "--lock-dir",
                          str(tmp_path), "--", sys.executable, "-c", probe],
                         env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[1] == "1" and int(out[0]) < torch.cuda.device_count()
