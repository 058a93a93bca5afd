"""The training loop: Muon + AdamW, schedule, wallclock cap, EMA, looping switch, resume state."""

import contextlib
import time
from dataclasses import dataclass, field, fields

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from pgolf.config import section
from pgolf.data.loader import LoaderConfig, to_batch
from pgolf.model.gpt import GPT, GPTConfig, quantizable_matrices
from pgolf.train.distributed import Dist, all_reduce
from pgolf.train.ema import EMA
from pgolf.train.muon import NS_COEFFS, POLAR_EXPRESS_COEFFS, SHARDINGS, Muon, iteration_coeffs
from pgolf.train.schedule import ScheduleConfig, lr_multiplier, muon_momentum, progress


@dataclass(kw_only=True)
class OptimConfig:
    matrix_lr: float = 0.04
    muon_momentum: float = 0.95
    muon_momentum_start: float = 0.85
    muon_momentum_warmup_steps: int = 500
    ns_steps: int = 5
    ns_method: str = "standard"  # standard (ns_coeffs) | polar_express (the record's table)
    ns_coeffs: list = field(default_factory=lambda: list(NS_COEFFS))  # one triple or ns_steps
    muon_sharding: str = "round_robin"  # round_robin (DDP) | sharded (the record's parallel Muon)
    row_normalize: bool = False
    muon_wd: float = 0.0
    embed_lr: float = 0.05
    embed_wd: float = 0.0
    head_lr: float = 0.008
    head_wd: float = 0.0
    scalar_lr: float = 0.04
    scalar_wd: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8

    def __post_init__(self):
        if self.ns_method not in ("standard", "polar_express"):
            raise ValueError(f"train.optim.ns_method = {self.ns_method!r}: standard or "
                             "polar_express")
        if self.muon_sharding not in SHARDINGS:
            raise ValueError(f"train.optim.muon_sharding = {self.muon_sharding!r}: one of "
                             f"{', '.join(SHARDINGS)}")
        if self.ns_method == "polar_express":
            if self.ns_steps > len(POLAR_EXPRESS_COEFFS):
                raise ValueError(f"train.optim.ns_steps = {self.ns_steps}: polar_express has "
                                 f"coefficients for at most {len(POLAR_EXPRESS_COEFFS)} steps")
            if list(self.ns_coeffs) != list(NS_COEFFS):
                raise ValueError(f"train.optim.ns_coeffs = {self.ns_coeffs}: set by "
                                 "ns_method = 'polar_express'; leave it at its default")
        try:
            iteration_coeffs(self.ns_coeffs, self.ns_steps)
        except ValueError as err:
            raise ValueError(f"train.optim.{err}") from None

    @property
    def ns_schedule(self) -> list[tuple[float, float, float]]:
        """The (a, b, c) of each Newton-Schulz iteration."""
        if self.ns_method == "polar_express":  # the record slices its table the same way
            return list(POLAR_EXPRESS_COEFFS[:self.ns_steps])
        return iteration_coeffs(self.ns_coeffs, self.ns_steps)


NESTED = {"schedule": ScheduleConfig, "optim": OptimConfig, "loader": LoaderConfig}


@dataclass(kw_only=True)
class TrainConfig:
    seq_len: int = 1024
    batch_tokens: int = 524_288
    steps: int | None = 20_000
    max_seconds: float | None = None
    reserve_seconds: float = 0.0  # the wallclock cap stops this much early (Hessian collection)
    progress: str = "steps"  # what the schedule, curriculum and looping follow: steps | wallclock
    nproc: int = 1
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False
    compile_warmup_steps: int = 0  # untimed steps that compile both graph variants, then reset
    ema_decay: float = 0.9965  # 0 = no EMA
    grad_clip: float = 0.0
    grad_clip_local: bool = False  # clip each rank's own gradient before communication (record)
    loop_enable_at: float = 0.35  # progress at which depth recurrence switches on
    checkpoint_every: int = 0  # steps between resume states; 0 = none
    log_every: int = 10
    val_batch_seqs: int = 32
    val_max_tokens: int | None = None
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, dict):  # nested sections from the YAML
                setattr(self, f.name, section(NESTED[f.name], value, f"train.{f.name}"))
        if self.batch_tokens % (self.seq_len * self.loader.streams):
            raise ValueError(f"train.batch_tokens={self.batch_tokens} must be a multiple of "
                             f"seq_len * loader.streams = {self.seq_len * self.loader.streams}")
        if self.progress not in ("steps", "wallclock"):
            raise ValueError(f"train.progress={self.progress!r}: steps or wallclock")
        if not (self.steps if self.progress == "steps" else self.max_seconds):
            need = "steps" if self.progress == "steps" else "max_seconds"
            raise ValueError(f"train.progress={self.progress!r} needs train.{need}")
        if self.grad_clip_local and self.optim.muon_sharding != "sharded":
            raise ValueError("train.grad_clip_local = True needs train.optim.muon_sharding = "
                             f"'sharded' (got {self.optim.muon_sharding!r}: DDP has already "
                             "averaged the gradients when clipping runs)")
        if self.loader.streams % self.nproc:
            raise ValueError(f"train.nproc={self.nproc} must divide train.loader.streams="
                             f"{self.loader.streams}")

    @property
    def budget_seconds(self) -> float | None:
        return self.max_seconds - self.reserve_seconds if self.max_seconds else None

    @property
    def micro_rows(self) -> int:
        """Sequences per micro-batch: one stream's share of the global batch."""
        return self.batch_tokens // self.seq_len // self.loader.streams


def build_optimizers(model: GPT, cfg: OptimConfig) -> list[torch.optim.Optimizer]:
    """Muon for block matrices; AdamW for the embedding, the untied head and the scalars."""
    named = dict(model.named_parameters())
    matrices = {n for n, _ in quantizable_matrices(model.cfg)} - {"tok_emb.weight",
                                                                   "lm_head.weight"}
    groups = {"embed": ["tok_emb.weight"], "head": [n for n in named if n.startswith("lm_head")]}
    groups["scalar"] = [n for n in named if n not in matrices and n not in
                        groups["embed"] + groups["head"]]
    muon = Muon([named[n] for n in named if n in matrices], lr=cfg.matrix_lr,
                momentum=cfg.muon_momentum, ns_steps=cfg.ns_steps, ns_coeffs=cfg.ns_schedule,
                row_normalize=cfg.row_normalize, weight_decay=cfg.muon_wd,
                sharding=cfg.muon_sharding)
    adam_groups = [{"params": [named[n] for n in names], "lr": getattr(cfg, f"{kind}_lr"),
                    "weight_decay": getattr(cfg, f"{kind}_wd")}
                   for kind, names in groups.items() if names]
    adam = torch.optim.AdamW(adam_groups, betas=tuple(cfg.betas), eps=cfg.eps,
                             fused=next(model.parameters()).is_cuda)
    for opt in (muon, adam):
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return [muon, adam]


@dataclass
class Run:
    """Everything a training step touches, so the loop functions take one argument."""

    cfg: TrainConfig
    model: GPT
    ddp: torch.nn.Module
    optimizers: list
    streams: list
    ema: EMA | None
    dist: Dist
    step: int = 0
    elapsed: float = 0.0
    metrics: list = field(default_factory=list)

    @property
    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16,
                              enabled=self.dist.device.type == "cuda")


def set_schedule(run: Run, frac: float) -> float:
    cfg = run.cfg
    mul = lr_multiplier(cfg.schedule, step=run.step, frac=frac)
    for opt in run.optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * mul
    momentum = muon_momentum(step=run.step, start=cfg.optim.muon_momentum_start,
                             end=cfg.optim.muon_momentum,
                             warmup_steps=cfg.optim.muon_momentum_warmup_steps)
    for group in run.optimizers[0].param_groups:
        group["momentum"] = momentum
    run.model.looping = run.model.cfg.num_loops > 0 and frac >= cfg.loop_enable_at
    return mul


def train_step(run: Run, frac: float) -> float:
    """One optimizer step over this rank's streams (one micro-batch each); returns the global
    mean loss. Raises on a non-finite loss, naming the step."""
    total = torch.zeros((), device=run.dist.device)
    last = len(run.streams) - 1
    for m, stream in enumerate(run.streams):
        x, y = to_batch(stream.draw(run.cfg.micro_rows, frac), run.dist.device)
        sync = m == last or not isinstance(run.ddp, DDP)
        with contextlib.nullcontext() if sync else run.ddp.no_sync(), run.autocast:
            loss = run.ddp(x, y) / len(run.streams)
        loss.backward()
        total += loss.detach()
    loss = float(all_reduce(total)) / run.dist.world
    if not torch.isfinite(torch.tensor(loss)):
        raise ValueError(f"training loss is {loss} at step {run.step} (lr multiplier "
                         f"{lr_multiplier(run.cfg.schedule, step=run.step, frac=frac):.3g}); "
                         "lower the learning rates or enable train.grad_clip")
    if run.cfg.optim.muon_sharding == "sharded":
        sync_sharded(run)
    elif run.cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
    for opt in run.optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(run.model)
    return loss


def sync_sharded(run: Run) -> None:
    """Gradient communication without DDP (parallel Muon): matrix gradients are reduce-scattered
    by Muon, the replicated (AdamW) gradients all-reduced (mean); then the clip, on the norm of
    the global mean gradient as with DDP unless train.grad_clip_local."""
    cfg, (muon, adam) = run.cfg, run.optimizers
    if cfg.grad_clip and cfg.grad_clip_local:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    muon.reduce_scatter_grads()
    replicated = [p.grad for g in adam.param_groups for p in g["params"] if p.grad is not None]
    if run.dist.world > 1 and replicated:
        flat = all_reduce(torch.cat([g.flatten() for g in replicated]),
                          op=torch.distributed.ReduceOp.AVG)
        for g, mean in zip(replicated, torch.split(flat, [g.numel() for g in replicated]),
                           strict=True):
            g.copy_(mean.view_as(g))
    if cfg.grad_clip and not cfg.grad_clip_local:
        clip_sharded(muon.sharded_grads(), replicated, max_norm=cfg.grad_clip)


def clip_sharded(shards: list, replicated: list, *, max_norm: float) -> None:
    """clip_grad_norm_ of the global mean gradient, held as disjoint shards + replicated parts."""
    square = torch.zeros((), device=replicated[0].device if replicated else shards[0].device)
    for g in shards:
        square += g.float().square().sum()
    square = all_reduce(square)  # the shards are disjoint: their squares add up
    for g in replicated:
        square += g.float().square().sum()
    coef = (max_norm / (square.sqrt() + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s coefficient
    for g in shards + replicated:
        g.mul_(coef.to(g.dtype))


def should_stop(run: Run) -> bool:
    cfg = run.cfg
    over = cfg.budget_seconds is not None and run.elapsed >= cfg.budget_seconds
    done = over or (cfg.steps is not None and run.step >= cfg.steps)
    flag = torch.tensor(float(done), device=run.dist.device)  # NCCL reduces CUDA tensors only
    return bool(all_reduce(flag, op=torch.distributed.ReduceOp.MAX))  # every rank stops together


def train_loop(run: Run, on_step=None) -> None:
    """Steps until the step count or the wallclock budget is reached."""
    cfg = run.cfg
    while not should_stop(run):
        start = time.perf_counter()
        by_steps = cfg.progress == "steps"
        frac = progress(step=run.step, elapsed=run.elapsed, steps=cfg.steps if by_steps else None,
                        seconds=None if by_steps else cfg.budget_seconds)
        mul = set_schedule(run, frac)
        loss = train_step(run, frac)
        if run.dist.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        run.elapsed += seconds
        run.step += 1
        run.metrics.append({"step": run.step, "loss": loss, "lr_mul": mul,
                            "tokens_per_s": cfg.batch_tokens / seconds, "elapsed": run.elapsed,
                            "looping": run.model.looping})
        if on_step is not None:
            on_step(run)


def build_run(model_cfg: GPTConfig, cfg: TrainConfig, *, dist: Dist, streams: list,
              seed: int) -> Run:
    torch.manual_seed(seed)
    model = GPT(model_cfg).to(dist.device)
    ddp = model
    if cfg.compile:
        ddp = torch.compile(ddp, dynamic=False)
    if dist.world > 1 and cfg.optim.muon_sharding == "sharded":
        broadcast_parameters(model)  # what DDP's constructor would do: every rank starts equal
    elif dist.world > 1:
        ddp = DDP(ddp, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None,
                  broadcast_buffers=False)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay else None
    return Run(cfg, model, ddp, build_optimizers(model, cfg.optim), streams, ema, dist)


@torch.no_grad()
def broadcast_parameters(model: torch.nn.Module) -> None:
    for tensor in [*model.parameters(), *model.buffers()]:
        torch.distributed.broadcast(tensor, src=0)
