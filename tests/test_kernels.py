"""The fused Triton kernels (model.kernels: triton) against the eager PyTorch path.

Triton decides at decoration time whether a kernel is compiled or interpreted, so the kernels run
in one child process started with TRITON_INTERPRET=1 (this file run as a script): it draws the
inputs, runs the kernels forward and backward and saves everything to one safetensors file. The
tests recompute the eager path on the same inputs in this process and compare.

Tolerances: in fp32 the kernels compute the same expressions as eager in another order (tiled K
sums, an online log-sum-exp, tanh through a sigmoid), a few ulps apart; 1e-5 of the largest entry
leaves ~100 ulps of headroom, while a wrong slope, a missing 1 - tanh^2, a mask off by one or an
unignored target is an O(1) error. The bound is on the largest entry rather than each entry
because 1 - tanh^2 at the cap's tails cancels in eager as in the kernel (~1e-4 relative there).
bf16 outputs round once (2^-8 relative), so those get 1e-2.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pgolf.kernels import fused_fc_activation, softcapped_cross_entropy
from pgolf.model.gpt import GPT, GPTConfig

# name: (rows, vocab, dtype, cap, block_v): vocab 100 and 77 are not multiples of the block
CE_CASES = {"fp32": (13, 100, "float32", 30.0, 32), "bf16": (7, 77, "bfloat16", 30.0, 32),
            "uncapped": (5, 64, "float32", 0.0, 64)}
# name: (batch shape, K, N, slope, dtype, blocks m/n/k): 45, 40 and 80 are not multiples. fp32
# only: Triton 3.9's interpreter multiplies bf16 dot operands as their uint16 bit patterns
# (InterpreterBuilder.create_dot), so the bf16 matmul is checked on CUDA (test_bf16_on_cuda).
MLP_CASES = {"leaky": ((3, 15), 40, 80, 0.5, "float32", (16, 32, 16)),
             "relu2": ((45,), 40, 80, 0.0, "float32", (16, 32, 16))}
TINY = dict(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2.0)


def assert_near(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Largest error within `rel` of the largest expected entry."""
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rel * expected.double().abs().max().item(), (err, expected.abs().max().item())


def leaf(t: torch.Tensor) -> torch.Tensor:
    """An fp32 leaf for the eager reference, apart from the fixture's tensor."""
    return t.detach().float().requires_grad_()


def _child_ce(out: dict) -> None:
    from pgolf.kernels import ops, softcap_ce
    for name, (n, vocab, dtype, cap, block) in CE_CASES.items():
        logits = (torch.randn(n, vocab) * 40).to(getattr(torch, dtype))  # reach the cap's tails
        targets = torch.randint(0, vocab, (n,))
        targets[1::4] = ops.IGNORE_INDEX
        grad_rows = torch.randn(n)
        loss, lse = softcap_ce.forward(logits, targets, cap=cap, ignore_index=ops.IGNORE_INDEX,
                                       block_v=block)
        out |= {f"ce.{name}.{k}": v for k, v in dict(
            logits=logits, targets=targets, grad_rows=grad_rows, loss=loss,
            grad=softcap_ce.backward(logits, targets, lse, grad_rows, cap=cap,
                                     ignore_index=ops.IGNORE_INDEX, block_v=block)).items()}
    logits = out["ce.fp32.logits"].clone().requires_grad_()
    ops.softcapped_cross_entropy(logits, out["ce.fp32.targets"], cap=30.0).backward()
    out["ce.mean.grad"] = logits.grad


def _child_mlp(out: dict) -> None:
    from pgolf.kernels import mlp, ops
    for name, (shape, k, n, slope, dtype, (bm, bn, bk)) in MLP_CASES.items():
        x = torch.randn(*shape, k).to(getattr(torch, dtype)).requires_grad_()
        weight = torch.randn(n, k).div(k ** 0.5).to(getattr(torch, dtype)).requires_grad_()
        grad_h = torch.randn(*shape, n).to(getattr(torch, dtype))
        h, pre = mlp.fc_activation(x.detach().reshape(-1, k), weight.detach(), slope=slope,
                                   block_m=bm, block_n=bn, block_k=bk)
        ops.fused_fc_activation(x, weight, slope=slope).backward(grad_h)
        out |= {f"mlp.{name}.{key}": v.detach() for key, v in dict(
            x=x, weight=weight, grad_h=grad_h, h=h.view(*shape, n), pre=pre.view(*shape, n),
            dx=x.grad, dw=weight.grad).items()}


def _child_model(out: dict) -> None:
    model = GPT(GPTConfig(**TINY, kernels="triton")).train()
    with torch.no_grad():  # off the init, where the zero projections would hide the MLP's grads
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    idx, targets = torch.randint(0, 64, (2, 12)), torch.randint(0, 64, (2, 12))
    targets[0, 3] = -100  # ignored, as F.cross_entropy ignores it
    loss = model(idx, targets)
    loss.backward()
    out |= {f"model.state.{k}": v for k, v in model.state_dict().items()}
    out |= {f"model.grad.{k}": p.grad for k, p in model.named_parameters()}
    out |= {"model.idx": idx, "model.targets": targets, "model.loss": loss.detach()}


@pytest.fixture(scope="module")
def kernels(tmp_path_factory) -> dict[str, torch.Tensor]:
    """What the kernels computed in the interpreter child (inputs, outputs, gradients)."""
    path = tmp_path_factory.mktemp("kernels") / "out.safetensors"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, __file__, str(path)], env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    return load_file(str(path))


@pytest.mark.parametrize("name", CE_CASES)
def test_softcapped_ce_matches_eager(kernels, name):
    _, _, dtype, cap, _ = CE_CASES[name]
    k = {key.split(".")[-1]: v for key, v in kernels.items() if key.startswith(f"ce.{name}.")}
    logits = leaf(k["logits"])
    z = cap * torch.tanh(logits / cap) if cap else logits
    loss = F.cross_entropy(z, k["targets"], reduction="none")
    (loss * k["grad_rows"]).sum().backward()
    assert_near(k["loss"], loss.detach(), 1e-5)  # fp32 from the same (bf16) logits
    assert_near(k["grad"].float(), logits.grad, 1e-5 if dtype == "float32" else 1e-2)
    ignored = k["targets"] == -100
    assert ignored.any() and (k["loss"][ignored] == 0).all() and (k["grad"][ignored] == 0).all()


def test_softcapped_ce_mean_is_over_counted_targets(kernels):
    logits = leaf(kernels["ce.fp32.logits"])
    F.cross_entropy(30 * torch.tanh(logits / 30), kernels["ce.fp32.targets"]).backward()
    assert_near(kernels["ce.mean.grad"], logits.grad, 1e-5)


@pytest.mark.parametrize("name", MLP_CASES)
def test_fc_activation_matches_eager(kernels, name):
    _, _, _, slope, _, _ = MLP_CASES[name]
    k = {key.split(".")[-1]: v for key, v in kernels.items() if key.startswith(f"mlp.{name}.")}
    x, weight = leaf(k["x"]), leaf(k["weight"])
    pre = x @ weight.T
    h = F.leaky_relu(pre, slope).square()
    h.backward(k["grad_h"].float())
    for actual, expected in ((k["pre"], pre), (k["h"], h), (k["dx"], x.grad),
                             (k["dw"], weight.grad)):
        assert_near(actual, expected.detach(), 1e-5)
    assert (k["h"] == 0).any() == (slope == 0)  # relu^2 zeroes the negative half, leaky does not


def test_triton_model_matches_eager(kernels):
    eager = GPT(GPTConfig(**TINY)).train()
    eager.load_state_dict({k.removeprefix("model.state."): v for k, v in kernels.items()
                           if k.startswith("model.state.")})
    loss = eager(kernels["model.idx"], kernels["model.targets"])
    loss.backward()
    assert_near(kernels["model.loss"], loss.detach(), 1e-5)
    for name, p in eager.named_parameters():
        assert_near(kernels[f"model.grad.{name}"], p.grad, 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="compiled Triton needs CUDA (and no TRITON_INTERPRET)")
def test_bf16_on_cuda():
    torch.manual_seed(0)
    x = torch.randn(300, 96, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(200, 96, device="cuda").div(96 ** 0.5).bfloat16().requires_grad_()
    h = fused_fc_activation(x, weight, slope=0.5)
    h.float().square().sum().backward()
    x32, w32 = leaf(x), leaf(weight)
    h32 = F.leaky_relu(x32 @ w32.T, 0.5).square()
    h32.square().sum().backward()
    for actual, expected in ((h, h32), (x.grad, x32.grad), (weight.grad, w32.grad)):
        assert_near(actual.float(), expected.detach(), 2e-2)  # dpre and the matmuls round in bf16
    logits = (torch.randn(300, 1000, device="cuda") * 40).bfloat16().requires_grad_()
    targets = torch.randint(0, 1000, (300,), device="cuda")
    softcapped_cross_entropy(logits, targets, cap=30.0).backward()
    logits32 = leaf(logits)
    loss = F.cross_entropy(30 * torch.tanh(logits32 / 30), targets)
    loss.backward()
    assert_near(logits.grad.float(), logits32.grad, 1e-2)


def test_triton_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = GPT(GPTConfig(**TINY, kernels="triton")).train()
    with torch.no_grad():  # off the init, where the zero projections would hide the MLP's grads
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    idx = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"model.kernels = 'triton': the tensors are on cpu"):
        model(idx, idx)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"model.kernels = 'triton': triton is not installed"):
        model(idx, idx)
    with pytest.raises(ValueError, match=r"model.kernels = 'cuda': eager or triton"):
        GPTConfig(kernels="cuda")


def test_eval_mode_stays_eager_for_calibration(monkeypatch):
    # No interpreter here: were a kernel called in eval mode this would raise.
    from pgolf.quant.hessian import collect_hessians
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    triton = GPT(GPTConfig(**TINY, kernels="triton")).eval()
    eager = GPT(GPTConfig(**TINY)).eval()
    eager.load_state_dict(triton.state_dict())
    batches = [torch.randint(0, 64, (2, 8))]
    got, want = collect_hessians(triton, batches), collect_hessians(eager, batches)
    assert got.keys() == want.keys() and "blocks.0.mlp.fc.weight" in got
    for name, (H, n) in want.items():
        assert torch.equal(got[name][0], H) and got[name][1] == n
    assert torch.equal(triton(batches[0], batches[0]), eager(batches[0], batches[0]))


def test_code_bytes_count_the_kernels_only_when_the_model_uses_them():
    from pgolf.bundle import closure
    from pgolf.config import load_config
    from pgolf.quant.codebytes import SRC

    spec = load_config(SRC.parent / "config.yaml")  # train_gpt.py embeds its closure
    files = {k: {str(f.relative_to(SRC)) for f in closure(
        {**spec, "model": {**spec["model"], "kernels": k}}, SRC)} for k in ("eager", "triton")}
    kernels = {"pgolf/kernels/ops.py", "pgolf/kernels/mlp.py", "pgolf/kernels/softcap_ce.py"}
    assert not kernels & files["eager"] and kernels <= files["triton"]


if __name__ == "__main__":  # the interpreter child: python tests/test_kernels.py OUT
    assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.manual_seed(0)
    results: dict[str, torch.Tensor] = {}
    for run in (_child_ce, _child_mlp, _child_model):
        run(results)
    save_file({k: v.contiguous() for k, v in results.items()}, sys.argv[1])
