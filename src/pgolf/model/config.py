"""The GPT config and its quantizable matrix names; no torch, so the DAG can read it."""

from dataclasses import dataclass


@dataclass(kw_only=True)
class GPTConfig:
    vocab_size: int = 1024
    num_layers: int = 4
    model_dim: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    mlp_mult: float = 4.0
    activation: str = "leaky_relu2"  # relu2 | leaky_relu2
    leaky_slope: float = 0.5
    tie_embeddings: bool = True
    logit_softcap: float = 30.0  # 0 = off
    qk_gain_init: float = 1.5
    rope_dims: int | None = None  # None = all head dims
    rope_base: float = 10000.0
    rope_train_seq_len: int = 1024  # longer sequences get an NTK rescale of the base
    ln_scale: bool = False
    resid_mix: bool = True
    skips: bool = True  # U-Net skips from encoder to decoder layers
    skip_gates: bool = False
    loop_start: int | None = None  # physical layers loop_start..loop_end (inclusive) repeat
    loop_end: int | None = None
    num_loops: int = 0  # extra passes: the looped layers run num_loops + 1 times
    parallel_from: int | None = None  # physical layers >= this use parallel residuals
    parallel_lanes: int = 1  # 1 = GPT-J (one stream); 2 = attention and MLP lanes, averaged
    xsa_last_n: int = 0  # exclusive self-attention on the last n physical layers
    embed_init_std: float = 0.005
    smear_gate: bool = False  # each embedding adds a gated share of the previous token's
    attn_gate: bool = False  # per-head sigmoid gate on the attention output
    attn_gate_scale: float = 0.5
    gate_window: int = 12  # the gates read the first gate_window channels of their input
    doc_isolation: bool = False  # attention stays inside documents (split at bos_id)
    bos_id: int = 1  # the tokenizer's BOS: where a document starts
    kernels: str = "eager"  # eager | triton: the fused MLP and loss in train mode

    def __post_init__(self):
        if self.model_dim % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"model: model_dim={self.model_dim}, num_heads={self.num_heads} and "
                             f"num_kv_heads={self.num_kv_heads} must divide evenly")
        if self.activation not in ("relu2", "leaky_relu2"):
            raise ValueError(f"model.activation={self.activation!r}: relu2 or leaky_relu2")
        if self.kernels not in ("eager", "triton"):
            raise ValueError(f"model.kernels = {self.kernels!r}: eager or triton")
        rope = self.rope_dims if self.rope_dims is not None else self.head_dim
        if rope % 2 or not 0 < rope <= self.head_dim:
            raise ValueError(f"model.rope_dims={self.rope_dims} must be even and <= head_dim "
                             f"{self.head_dim}")
        if self.num_loops:
            start, end = self.loop_start, self.loop_end
            if start is None or end is None or not 0 <= start <= end < self.num_layers:
                raise ValueError(f"model: loop_start={start}, loop_end={end} must satisfy "
                                 f"0 <= start <= end < num_layers={self.num_layers}")
        self._check_gates()
        self._check_lanes()

    def _check_gates(self):
        if (self.smear_gate or self.attn_gate) and not 1 <= self.gate_window <= self.model_dim:
            raise ValueError(f"model.gate_window = {self.gate_window}: must be in 1..model_dim = "
                             f"{self.model_dim} (the gates read that many input channels)")
        if (self.smear_gate or self.doc_isolation) and not 0 <= self.bos_id < self.vocab_size:
            raise ValueError(f"model.bos_id = {self.bos_id}: must be a token id below vocab_size "
                             f"= {self.vocab_size} (smear_gate and doc_isolation read it)")

    def _check_lanes(self):
        if self.parallel_lanes not in (1, 2):
            raise ValueError(f"model.parallel_lanes = {self.parallel_lanes}: must be 1 or 2")
        if self.parallel_lanes == 1:
            return
        if self.parallel_from is None:
            raise ValueError("model.parallel_from = None: parallel_lanes = 2 needs the first "
                             "two-lane layer")
        for looping in (False, True):
            seq, n_enc = self.layer_sequence(looping), len(self.split(looping)[0])
            lanes = [p for p, layer in enumerate(seq) if self.two_lane(layer)]
            # The skip stack carries one stream, and the lanes merge only at the end, so the
            # two-lane layers must be the last virtual layers, all in the decoder.
            if lanes and (lanes[0] < n_enc or lanes != list(range(lanes[0], len(seq)))):
                raise ValueError(f"model.parallel_from = {self.parallel_from}: with "
                                 f"parallel_lanes = 2 the layers from it must be the last "
                                 f"virtual layers, all in the decoder (sequence {seq}, "
                                 f"encoder length {n_enc})")

    def two_lane(self, layer: int) -> bool:
        """Whether physical layer `layer` runs as a two-lane parallel block."""
        return self.parallel_lanes == 2 and self.parallel_from is not None \
            and layer >= self.parallel_from

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_mult * self.model_dim)

    def layer_sequence(self, looping: bool) -> list[int]:
        """Physical layer index of each virtual layer, in order."""
        layers = list(range(self.num_layers))
        if not (looping and self.num_loops):
            return layers
        start, end = self.loop_start, self.loop_end
        return layers[:start] + layers[start:end + 1] * (self.num_loops + 1) + layers[end + 1:]

    def looped_layers(self, looping: bool) -> set[int]:
        """Physical layers that run more than once per forward pass."""
        if not (looping and self.num_loops):
            return set()
        return set(range(self.loop_start, self.loop_end + 1))

    def split(self, looping: bool) -> tuple[list[int], list[int]]:
        """Encoder and decoder halves of the virtual sequence (the encoder is the shorter)."""
        seq = self.layer_sequence(looping)
        return seq[:len(seq) // 2], seq[len(seq) // 2:]

    @property
    def num_skips(self) -> int:
        if not self.skips:
            return 0
        encoder, decoder = self.split(looping=True)
        return min(len(encoder), len(decoder))


def quantizable_matrices(cfg: GPTConfig) -> list[tuple[str, tuple[int, int]]]:
    """Checkpoint names and shapes of the matrices the quantizer handles (no weights built)."""
    d, kv = cfg.model_dim, cfg.num_kv_heads * cfg.head_dim
    per_block = [("attn.c_q", (d, d)), ("attn.c_k", (kv, d)), ("attn.c_v", (kv, d)),
                 ("attn.proj", (d, d)), ("mlp.fc", (cfg.mlp_hidden, d)),
                 ("mlp.proj", (d, cfg.mlp_hidden))]
    names = [(f"blocks.{i}.{name}.weight", shape)
             for i in range(cfg.num_layers) for name, shape in per_block]
    names.append(("tok_emb.weight", (cfg.vocab_size, d)))
    if not cfg.tie_embeddings:
        names.append(("lm_head.weight", (cfg.vocab_size, d)))
    return names
