"""Phased LoRA test-time training, the SOTA record's evaluation (`eval_val_ttt_phased`).

Documents start at BOS; each runs to the next BOS inclusive, so together they score every target
once. They are sorted by length into batches of batch_docs, processed longest batch first. A
document is cut into chunks of chunk_size targets. Per chunk: score it with the frozen model plus
that document's LoRA (context: the last <= seq_len tokens ending at the chunk's end, inside the
document), then, unless it is the document's last chunk, one AdamW step on the chunk's mean loss.
The score and the step come from one forward pass, so a chunk is scored before any update that
saw it. B restarts at zero per batch; A is kept warm across a rank's batches (warm_start_a).

Phases: at num_phases even boundaries of the first prefix_docs documents scored, SGD trains
every base-model parameter on documents already scored (`boundary` of them, taken in the
record's (batch, position) order; packed rows cut at every BOS, so no token sees another
document), gradients summed over ranks; then the adapters are made afresh and scoring goes on.

Ranks: the record pulls batches from a locked counter file; here batch j of a phase goes to rank
j % world, a static split, so the result is reproducible. With warm_start_a the A a batch starts
from depends on which batches its rank ran before it, so only without it is the result the same
for any number of ranks.
"""

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from pgolf.config import section
from pgolf.data.bytecount import ByteCounter
from pgolf.eval.lora_ttt import Adapters, Attached
from pgolf.eval.sliding import chunk_totals, scored_targets
from pgolf.eval.ttt import TTTConfig, lr_schedule, sequence_starts, train_chunk
from pgolf.train.distributed import all_reduce

BOS = 1  # the BOS id of pgolf's tokenizers, which starts every document of the shards


@dataclass(kw_only=True)
class PhasesConfig:
    prefix_docs: int = 2500  # documents scored before the last global phase
    num_phases: int = 3  # global SGD phases at even boundaries of prefix_docs; 0 = none
    lr: float = 0.001  # peak; a cosine across the phase's chunks
    momentum: float = 0.9
    epochs: int = 1
    chunk_tokens: int = 32768  # tokens per cosine step (the last chunk gets lr 0: skipped)
    batch_seqs: int = 32  # sequences of seq_len per optimizer step, over all ranks together
    grad_clip: float = 1.0  # 0 = no clipping


@dataclass(kw_only=True)
class LoRATTTConfig:
    chunk_size: int = 48  # targets per chunk: score, then one step
    rank: int = 80
    alpha: float = 144.0  # adapter output scale alpha / rank
    lr: float = 1e-4
    betas: list = field(default_factory=lambda: [0.0, 0.99])
    eps: float = 1e-10
    weight_decay: float = 0.5
    batch_docs: int = 64
    warm_start_a: bool = True
    seed: int = 0  # of the adapters' A initialisation
    phases: PhasesConfig = field(default_factory=PhasesConfig)

    def __post_init__(self):
        if isinstance(self.phases, dict):
            self.phases = section(PhasesConfig, self.phases, "lora_ttt.phases")
        positive = {"chunk_size": self.chunk_size, "rank": self.rank,
                    "batch_docs": self.batch_docs, "phases.epochs": self.phases.epochs,
                    "phases.chunk_tokens": self.phases.chunk_tokens,
                    "phases.batch_seqs": self.phases.batch_seqs}
        at_least_zero = {"lr": self.lr, "weight_decay": self.weight_decay, "eps": self.eps,
                         "alpha": self.alpha, "phases.prefix_docs": self.phases.prefix_docs,
                         "phases.num_phases": self.phases.num_phases, "phases.lr": self.phases.lr,
                         "phases.momentum": self.phases.momentum,
                         "phases.grad_clip": self.phases.grad_clip}
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"lora_ttt.{key} = {value}: must be >= 1")
        for key, value in at_least_zero.items():
            if value < 0:
                raise ValueError(f"lora_ttt.{key} = {value}: must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"lora_ttt.betas = {self.betas}: must be two numbers in [0, 1)")


def find_docs(stream: np.ndarray, bos: int = BOS) -> np.ndarray:
    """Rows (start, length) of the documents of `stream`: each from its BOS to the next BOS
    inclusive (the last to the stream's end), so their targets tile 1..len(stream) - 1 once.
    Tokens before the first BOS count as a document of their own."""
    starts = np.flatnonzero(stream == bos)
    if not len(starts) or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    ends = np.append(starts[1:] + 1, len(stream))
    docs = np.stack([starts, ends - starts], axis=1).astype(np.int64)
    return docs[docs[:, 1] >= 2]  # a BOS as the very last token predicts nothing


def doc_batches(docs: np.ndarray, batch_docs: int) -> tuple[list[np.ndarray], list[int]]:
    """Indices of `docs` sorted by length (stable) and cut into batches of batch_docs, and the
    order they run in: the batch with the longest document first (the record's queue)."""
    order = np.argsort(docs[:, 1], kind="stable")
    batches = [order[i:i + batch_docs] for i in range(0, len(order), batch_docs)]
    queue = sorted(range(len(batches)), key=lambda j: -int(docs[batches[j], 1].max()))
    return batches, queue


def phase_docs(batches: list[np.ndarray], scored: list[int], boundary: int) -> np.ndarray:
    """The documents a phase trains on: of the scored batches' documents, ordered by (batch,
    position in it) as the record orders them, the first `boundary`."""
    return np.concatenate([batches[j] for j in sorted(scored)])[:boundary]


def chunk_window(ci: int, pred_len: int, chunk_size: int, seq_len: int):
    """(window start, window length, chunk offset in the window, chunk length) of chunk ci of a
    document with pred_len targets, positions relative to the document's first token."""
    chunk_start = ci * chunk_size
    chunk_end = min(chunk_start + chunk_size, pred_len)
    win_start = max(0, chunk_end - seq_len)
    return win_start, chunk_end - win_start, chunk_start - win_start, chunk_end - chunk_start


@dataclass
class Tally:
    """Per-chunk-of-targets sums (nll nats on the device, tokens and bytes as integers): the same
    bins every other mode reports, so any two modes pair over them."""

    nll: torch.Tensor
    tokens: np.ndarray
    bytes: np.ndarray
    chunk_tokens: int

    @classmethod
    def zeros(cls, num_targets: int, chunk_tokens: int, device: torch.device) -> "Tally":
        n = -(-num_targets // chunk_tokens)
        return cls(torch.zeros(n, dtype=torch.float64, device=device),
                   np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64), chunk_tokens)

    def add(self, nll: torch.Tensor, positions: np.ndarray, num_bytes: np.ndarray) -> None:
        bins = (positions - 1) // self.chunk_tokens  # target index = stream position - 1
        self.nll.index_add_(0, torch.from_numpy(bins).to(self.nll.device), nll.double())
        np.add.at(self.tokens, bins, 1)
        np.add.at(self.bytes, bins, num_bytes)

    def reduced(self) -> torch.Tensor:
        sums = torch.stack([self.nll, torch.from_numpy(self.tokens).to(self.nll),
                            torch.from_numpy(self.bytes).to(self.nll)], dim=1)
        return all_reduce(sums)


def chunk_inputs(stream: np.ndarray, docs: np.ndarray, ci: int, *, chunk_size: int,
                 seq_len: int) -> dict:
    """Chunk ci of the documents still in it: their indices `rows`, inputs and targets `x`, `y`
    (R, T) padded with token 0 past each window (causal attention keeps padding out), `cols`
    (R, chunk_size) the chunk's positions in its window, `scored` (R, chunk_size) which of them
    are real, `positions` the stream index of each chunk target, and which rows train (all but
    their document's last chunk)."""
    pred = docs[:, 1] - 1
    rows = np.flatnonzero(ci * chunk_size < pred)
    win = np.array([chunk_window(ci, int(pred[r]), chunk_size, seq_len) for r in rows])
    width = int(win[:, 1].max())
    offsets = np.arange(width)
    real = offsets < win[:, 1:2]
    pos = docs[rows, :1] + win[:, :1] + offsets  # stream index of each input token
    index = np.minimum(pos, len(stream) - 2)
    x = np.where(real, stream[index], 0)
    y = np.where(real, stream[index + 1], 0)
    cols = np.minimum(win[:, 2:3] + np.arange(chunk_size), width - 1)
    return {"rows": rows, "x": x, "y": y, "cols": cols,
            "scored": np.arange(chunk_size) < win[:, 3:4],
            "positions": np.take_along_axis(pos, cols, 1) + 1,
            "trains": (ci + 1) * chunk_size < pred[rows]}


def score_batch(attached: Attached, optimizer, stream: np.ndarray, docs: np.ndarray,
                counter: ByteCounter, tally: Tally, *, cfg: LoRATTTConfig, seq_len: int,
                device: torch.device, autocast: bool) -> None:
    """Score one batch of documents chunk by chunk, one optimizer step after each chunk."""
    def put(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(device)

    num_chunks = -(-(int(docs[:, 1].max()) - 1) // cfg.chunk_size)
    for ci in range(num_chunks):
        c = chunk_inputs(stream, docs, ci, chunk_size=cfg.chunk_size, seq_len=seq_len)
        prev = np.take_along_axis(c["x"], c["cols"], 1)
        target = np.take_along_axis(c["y"], c["cols"], 1)
        every = len(c["rows"]) == len(docs)  # no slice gather while all documents run
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            nll = attached(put(c["x"]), put(target), None if every else put(c["rows"]),
                           put(c["cols"]))
        scored = c["scored"]
        tally.add(nll.detach()[put(scored)], c["positions"][scored],
                  counter.target_bytes(prev[scored], target[scored], c["positions"][scored]))
        if c["trains"].any():
            weight = put(scored & c["trains"][:, None]).float()
            loss = (nll * weight).sum(1) / weight.sum(1).clamp(min=1)  # per-document mean
            optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()
            optimizer.step()


def phase_plan(sizes: list[int], cfg: PhasesConfig) -> list[tuple[int, int]]:
    """(last queue position before the phase, documents it trains on) per global phase, for
    batches of `sizes` documents in queue order: a phase runs once `boundary` are scored."""
    prefix = min(cfg.prefix_docs, sum(sizes))
    ends = np.cumsum(sizes)
    plan = []
    for k in range(cfg.num_phases):
        boundary = prefix * (k + 1) // cfg.num_phases
        if boundary > 0:
            plan.append((int(np.searchsorted(ends, boundary)), boundary))
    return plan


class Isolated:
    """`model` trained on packed rows with no token attending across a document: each row is cut
    at every BOS of its inputs (and at its start, as the record's varlen attention cuts it), the
    pieces run as rows of their own, and the per-token NLL goes back to the row layout."""

    def __init__(self, model, bos: int = BOS):
        self.model, self.bos = model, bos

    def __call__(self, x: torch.Tensor, y: torch.Tensor, reduction: str = "none"):
        assert reduction == "none"
        B, T = x.shape
        flat_x, flat_y = x.reshape(-1), y.reshape(-1)
        cut = flat_x == self.bos
        cut[::T] = True
        piece = torch.cumsum(cut, 0) - 1
        starts = cut.nonzero().flatten()
        offset = torch.arange(B * T, device=x.device) - starts[piece]
        width = int(offset.max()) + 1
        px = torch.zeros(len(starts), width, dtype=x.dtype, device=x.device)
        py = torch.zeros_like(px)
        px[piece, offset], py[piece, offset] = flat_x, flat_y
        return self.model(px, py, reduction="none")[piece, offset].view(B, T)


def global_phase(model, tokens: np.ndarray, *, cfg: PhasesConfig, seq_len: int,
                 device: torch.device, autocast: bool, rank: int, world: int,
                 bos: int = BOS) -> int:
    """SGD on every base-model parameter over `tokens` (the scored documents back to back), in
    chunks of cfg.chunk_tokens at a cosine learning rate across chunks, document-isolated,
    gradients summed over ranks (`ttt.train_chunk`). Returns the optimizer steps taken."""
    total = len(tokens) - 1
    num_chunks = -(-total // cfg.chunk_tokens)
    step = TTTConfig(chunk_tokens=cfg.chunk_tokens, epochs=cfg.epochs, lr=cfg.lr,
                     momentum=cfg.momentum, grad_clip=cfg.grad_clip, batch_seqs=cfg.batch_seqs)
    lrs = lr_schedule(step, num_chunks)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    steps = 0
    model.train()
    for c in range(num_chunks - 1):  # the last chunk's rate is 0: the record skips it too
        for group in optimizer.param_groups:
            group["lr"] = lrs[c]
        lo = c * cfg.chunk_tokens
        starts = sequence_starts(lo, min(lo + cfg.chunk_tokens, total), seq_len)
        train_chunk(Isolated(model, bos), optimizer, params, tokens, starts, cfg=step,
                    seq_len=seq_len, device=device, autocast=autocast, rank=rank, world=world)
        steps += cfg.epochs * -(-len(starts) // cfg.batch_seqs)
    model.eval()
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    return steps


def score_batches(model, stream: np.ndarray, docs: np.ndarray, batches: list, mine: list,
                  counter: ByteCounter, tally: Tally, *, cfg: LoRATTTConfig, seq_len: int,
                  device: torch.device, autocast: bool) -> None:
    """Score this rank's batches (indices `mine`, in order) of one phase. Each batch gets fresh
    B and fresh optimizer state; A is made afresh per batch, or once per phase with
    warm_start_a (again if the batch size changes, as the record makes a new adapter then)."""
    adapters = None
    for j in mine:
        part = docs[batches[j]]
        if adapters is None or not cfg.warm_start_a or adapters.docs != len(part):
            adapters = Adapters(model, len(part), rank=cfg.rank, alpha=cfg.alpha,
                                seed=cfg.seed * 1_000_003 + j, device=device)
        else:
            adapters.reset_b()
        optimizer = torch.optim.AdamW(adapters.parameters(), lr=cfg.lr,
                                      betas=tuple(map(float, cfg.betas)), eps=cfg.eps,
                                      weight_decay=cfg.weight_decay, fused=True)
        score_batch(Attached(model, adapters), optimizer, stream, part, counter, tally, cfg=cfg,
                    seq_len=seq_len, device=device, autocast=autocast)


def phased_bpb(model, stream: np.ndarray, counter: ByteCounter, *, cfg: LoRATTTConfig, seq_len: int,
               device: torch.device, rank: int = 0, world: int = 1,
               max_tokens: int | None = None, autocast: bool = False,
               chunk_tokens: int | None = None, bos: int = BOS) -> dict:
    """Phased LoRA TTT over the roundtrip targets (per-chunk sums over chunks of chunk_tokens
    targets, as the other modes report them); the global phases adapt the model in place.
    `bos` is the tokenizer's BOS id, which starts every document."""
    if cfg.chunk_size > seq_len:  # a window ending at the chunk's end must hold all of it
        raise ValueError(f"lora_ttt.chunk_size = {cfg.chunk_size}: must be <= the eval seq_len "
                         f"({seq_len}), the context window that scores a chunk")
    if cfg.phases.num_phases and cfg.phases.chunk_tokens < seq_len:
        raise ValueError(f"lora_ttt.phases.chunk_tokens = {cfg.phases.chunk_tokens}: must be >= "
                         f"the eval seq_len ({seq_len}), the length of the sequences it trains on")
    num_targets = scored_targets(stream, seq_len, max_tokens)
    stream = stream[:num_targets + 1]
    docs = find_docs(stream, bos)
    batches, queue = doc_batches(docs, cfg.batch_docs)
    plan = phase_plan([len(batches[j]) for j in queue], cfg.phases)
    tally = Tally.zeros(num_targets, chunk_tokens or num_targets, device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    seconds, phases, first = {"score": 0.0, "global": 0.0}, [], 0
    for last, boundary in [*plan, (len(batches) - 1, 0)]:
        start = time.perf_counter()
        score_batches(model, stream, docs, batches, queue[first:last + 1][rank::world], counter,
                      tally, cfg=cfg, seq_len=seq_len, device=device, autocast=autocast)
        seconds["score"] += time.perf_counter() - start
        first = max(first, last + 1)
        if boundary:
            start = time.perf_counter()
            chosen = docs[phase_docs(batches, queue[:last + 1], boundary)]
            tokens = np.concatenate([stream[s:s + n] for s, n in chosen])
            steps = global_phase(model, tokens, cfg=cfg.phases, seq_len=seq_len, device=device,
                                 autocast=autocast, rank=rank, world=world, bos=bos)
            seconds["global"] += time.perf_counter() - start
            phases.append({"after_batch": last, "docs": boundary, "tokens": len(tokens),
                           "steps": steps})
    for p in model.parameters():
        p.requires_grad_(True)
    return chunk_totals(tally.reduced(), {"docs": len(docs), "batches": len(batches),
                                          "phases": phases, "score_seconds": seconds["score"],
                                          "global_seconds": seconds["global"]})
