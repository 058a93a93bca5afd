# Shared helpers: config validation, result paths, code hashes, seeds.
import json
from pathlib import Path

from pgolf.codehash import code_hash
from pgolf.config import validate_config
from pgolf.grid import variant_configs
from pgolf.model.config import GPTConfig, quantizable_matrices
from pgolf.bundle import model_code
from pgolf.quant.codebytes import code_bytes


def config_error(message):
    """A config mistake, named with the config files it came from."""
    return WorkflowError(f"{', '.join(map(str, workflow.configfiles))}: {message}")


def check_config():
    """Schema check (fills defaults) plus the cross-section rules the schema cannot say."""
    files = workflow.configfiles
    try:
        validate_config(
            config,
            schema=workflow.source_path("../schemas/config.schema.yaml"),
            files=files,
        )
    except ValueError as err:
        raise WorkflowError(f"invalid config: {err}") from None
    check_variants()
    corpus = config["corpus"]
    if corpus["source"] in ("text", "jsonl", "shards") and not corpus["path"]:
        raise config_error(f"corpus.source={corpus['source']!r} needs corpus.path")
    if corpus["source"] == "shards" and not config["tokenizer"]["model"]:
        raise config_error("corpus.source='shards' needs tokenizer.model")
    # the trainer checks this too; here it fails before any job runs (without importing torch)
    train = config["train"]
    if train["loader"]["streams"] % train["nproc"]:
        raise config_error(
            f"train.nproc = {train['nproc']} must divide train.loader.streams = "
            f"{train['loader']['streams']} (each rank reads whole streams)"
        )
    allocate = config["allocate"]
    budget = str(allocate["rd"]["budget"])
    reference = budget.removeprefix("policy:")
    if "rd" in allocate["policies"] and budget.startswith("policy:"):
        if reference == "rd" or reference not in allocate["policies"]:
            raise config_error(
                f"allocate.rd.budget = {budget!r} must name another policy in "
                f"allocate.policies {allocate['policies']}"
            )


def check_variants():
    """`variants:` is validated (pgolf.grid), but the DAG does not run a grid yet: refuse it
    plainly rather than run the base config alone."""
    if not config["variants"]:
        return
    try:
        configs = variant_configs(config, files=workflow.configfiles)
    except ValueError as err:
        raise config_error(str(err)) from None
    names = [name for name in configs if name != "base"]
    raise config_error(
        f"variants {names}: valid, but the DAG does not run ablation grids yet (the stage "
        "keys of pgolf.grid are not wired into the output paths); run each variant as its own "
        "--configfile overlay with its own `run` name"
    )


def check_eval():
    """Eval settings against the window length they apply to (seq_len defaults to train's)."""
    section = config["eval"]
    seq_len = section["seq_len"] or config["train"]["seq_len"]
    limits = {
        "eval.stride": (section["stride"], "at most"),
        "eval.max_tokens": (section["max_tokens"] or seq_len, "at least"),
        "ttt.chunk_tokens": (config["ttt"]["chunk_tokens"], "at least"),
    }
    lora = config["lora_ttt"]
    if "phased_ttt" in section["modes"]:
        limits["lora_ttt.chunk_size"] = (lora["chunk_size"], "at most")
        if lora["phases"]["num_phases"]:
            limits["lora_ttt.phases.chunk_tokens"] = (
                lora["phases"]["chunk_tokens"],
                "at least",
            )
    for key, (value, bound) in limits.items():
        if (value > seq_len) if bound == "at most" else (value < seq_len):
            raise config_error(
                f"{key} = {value} must be {bound} the eval seq_len ({seq_len})"
            )


def model_shapes():
    """Checkpoint names and shapes of the quantizable matrices (no weights built)."""
    try:
        model = GPTConfig(
            **config["model"], vocab_size=config["tokenizer"]["vocab_size"]
        )
    except ValueError as err:
        raise WorkflowError(f"invalid model config: {err}") from None
    return dict(quantizable_matrices(model))


def model_matrices():
    """Checkpoint names of the quantizable matrices: the sweep fans out on them."""
    return list(model_shapes())


def check_lqer():
    """LQER's rank against the matrices it may correct (the sweep and export check it too, but
    here it fails before any job runs), and uniform's top-k against a rank of 0."""
    rank = config["lqer"]["rank"]
    if rank:
        name, shape = min(model_shapes().items(), key=lambda kv: (min(kv[1]), kv[0]))
        if rank > min(shape):
            raise config_error(
                f"lqer.rank = {rank}: above the rank {min(shape)} of {name} "
                f"({shape[0]} x {shape[1]})"
            )
    top_k = config["allocate"]["uniform"]["lqer_top_k"]
    if top_k and not rank and "uniform" in config["allocate"]["policies"]:
        raise config_error(
            f"allocate.uniform.lqer_top_k = {top_k} needs lqer.rank > 0 (the sweep measures "
            "the corrections at that rank)"
        )


check_config()
check_eval()
check_lqer()

RUN = config["run"]
POLICIES = config["allocate"]["policies"]
MATRICES = model_matrices()
SEEDS = config["seeds"]
SRC = Path(workflow.basedir) / "src"
SCRIPTS = Path(workflow.basedir) / "workflow_scripts"
# The fused kernels the model imports by name under model.kernels: triton (training, TTT).
MODEL_CODE = [f"src/{entry}" for entry in model_code(config["model"]["kernels"])]


def data(name):
    """Path of a data-stage output of this run."""
    return f"results/{RUN}/data/{name}"


def log(name):
    return f"results/{RUN}/logs/{name}.log"


def bench(name):
    return f"results/{RUN}/benchmarks/{name}.tsv"


def stage_code(*scripts):
    """Content hash of workflow scripts (or pgolf modules, by path under the checkout) and every
    pgolf module they import: the rerun trigger."""
    paths = [
        SCRIPTS / s if "/" not in s else Path(workflow.basedir) / s for s in scripts
    ]
    return code_hash(*paths, src=SRC)


def seed_path(name):
    """Path of a per-seed output; {seed} is the wildcard."""
    return f"results/{RUN}/seed{{seed}}/{name}"


def train_spec():
    """The model and train sections the trainer runs with, as one JSON string."""
    model = {**config["model"], "vocab_size": config["tokenizer"]["vocab_size"]}
    return json.dumps({"model": model, "train": config["train"]}, sort_keys=True)


def gpus(section):
    """GPUs a job of this config section holds: one per process (train and eval run nproc) unless
    its device is the CPU. `auto` counts as a GPU: where none exists the job runs on the CPU.
    """
    settings = config[section]
    return settings.get("nproc", 1) if settings["device"] != "cpu" else 0


def final_targets():
    artifacts = expand(
        seed_path("artifact/{policy}.json"),
        seed=SEEDS,
        policy=POLICIES,
    )
    sensitivity = expand(seed_path("sensitivity.parquet"), seed=SEEDS)
    return [
        data("curriculum.parquet"),
        data("curriculum.png"),
        *artifacts,
        *sensitivity,
        f"results/{RUN}/seeds.json",
        f"results/{RUN}/seeds.md",
        f"results/{RUN}/seeds.html",
        f"results/{RUN}/submission",
        *analysis_targets(),
        f"results/{RUN}/loss_curves.png",
        *expand(seed_path("{plot}.png"), seed=SEEDS, plot=["allocation", "bytes"]),
    ]


def submission_settings():
    """The submission section with its defaults resolved and checked against the run."""
    settings = dict(config["submission"])
    settings["seeds"] = settings["seeds"] or SEEDS
    settings["policy"] = settings["policy"] or POLICIES[-1]
    settings["mode"] = settings["mode"] or config["eval"]["modes"][-1]
    checks = {
        "seeds": (set(settings["seeds"]) <= set(SEEDS), f"seeds {SEEDS}"),
        "policy": (settings["policy"] in POLICIES, f"allocate.policies {POLICIES}"),
        "mode": (settings["mode"] in config["eval"]["modes"], "eval.modes"),
    }
    for key, (ok, among) in checks.items():
        if not ok:
            raise config_error(
                f"submission.{key} = {settings[key]!r} is not among {among}"
            )
    return settings


def submission_inputs(wildcards):
    settings = submission_settings()
    seeds, policy = settings["seeds"], settings["policy"]
    return {
        "evals": expand(
            seed_path("eval/{policy}/{mode}.json"),
            seed=seeds,
            policy=policy,
            mode=config["eval"]["modes"],
        ),
        "artifacts": expand(
            seed_path("artifact/{policy}.pgz"), seed=seeds, policy=policy
        ),
        # read beside each artifact: its bytes, code bytes and budget margin
        "artifact_meta": expand(
            seed_path("artifact/{policy}.json"), seed=seeds, policy=policy
        ),
        "train": expand(seed_path("train.json"), seed=seeds),
        # frozen into the exported train_gpt.py
        "allocations": expand(
            seed_path("alloc/{policy}.json"), seed=seeds, policy=policy
        ),
    }


def eval_results():
    """Every configured mode's result for every seed and policy."""
    return expand(
        seed_path("eval/{policy}/{mode}.json"),
        seed=SEEDS,
        policy=POLICIES,
        mode=config["eval"]["modes"],
    )


def eval_spec(mode):
    """The config slices one eval mode reads, as JSON: a change elsewhere must not rerun it."""
    section = config["eval"]
    keys = ["batch_seqs", "max_tokens", "device", "nproc", "autocast", "compile"]
    spec = {"eval": {key: section[key] for key in keys}}
    spec["eval"]["seq_len"] = section["seq_len"] or config["train"]["seq_len"]
    if mode in ("sliding", "ttt"):
        spec["eval"]["stride"] = section["stride"]
    if mode == "roundtrip":
        spec["guard"] = section["guard"]
    # every mode sums per chunk of TTT's chunks, so any two modes pair over the same chunks
    spec["ttt"] = {"chunk_tokens": config["ttt"]["chunk_tokens"]}
    if mode == "ttt":
        spec["ttt"] = config["ttt"]
    if mode == "phased_ttt":
        spec["lora_ttt"] = config["lora_ttt"]
    return json.dumps(spec, sort_keys=True)


def gpu_slots(gpus):
    """The command prefix that gives a local GPU job its own devices (pgolf.gpuslots: file locks
    per device index, CUDA_VISIBLE_DEVICES; a no-op inside SLURM jobs). CPU jobs run as they are.
    """
    return f"python -m pgolf.gpuslots --gpus {gpus} -- " if gpus else ""


def eval_launcher():
    """One process runs plainly; several run under torchrun (gloo on CPU, NCCL on GPUs)."""
    nproc = config["eval"]["nproc"]
    launcher = (
        "python" if nproc == 1 else f"torchrun --standalone --nproc_per_node={nproc}"
    )
    return gpu_slots(gpus("eval")) + launcher


def eval_inputs(wildcards):
    """roundtrip reads the float checkpoint (the guard's report) and prequant's result; the
    other modes wait for roundtrip: a guarded artifact costs no further evaluation."""
    inputs = {
        "artifact": seed_path("artifact/{policy}.pgz"),
        "shards": data("shards"),
        "tokenizer": data("tokenizer.model"),
    }
    if wildcards.mode == "roundtrip":
        inputs["model"] = seed_path("model.safetensors")
        inputs["prequant"] = seed_path("eval/{policy}/prequant.json")
    else:
        inputs["gate"] = seed_path("eval/{policy}/roundtrip.json")
    return {name: path.format(**wildcards) for name, path in inputs.items()}


def eval_args(wildcards, input):
    """The CLI's input flags, from the named inputs it reads."""
    names = ("model", "artifact", "prequant")
    return " ".join(f"--{name} {input[name]}" for name in names if name in input.keys())


# Input functions: what a stage reads depends on the configured source.
def corpus_inputs(wildcards):
    source, path = config["corpus"]["source"], config["corpus"]["path"]
    if source == "demo":
        bundled = Path(workflow.basedir) / "data"
        return {"demo": bundled / "sotu.jsonl.xz", "sidecar": bundled / "sotu.json"}
    if source in ("text", "jsonl"):
        return {"source": path}
    return {}  # hf (and hub_shards) download into their own cache


def tokenizer_inputs(wildcards):
    if config["tokenizer"]["model"]:
        return {"model": config["tokenizer"]["model"]}
    # hub_shards: the tokenizer its shards were made with
    if config["corpus"]["source"] == "hub_shards":
        return {"model": data("hub_tokenizer.model")}
    return {"docs": data("docs.jsonl"), "corpus": data("docs.json")}


def shards_inputs(wildcards):
    if config["corpus"]["source"] == "shards":
        return {
            "tokenizer": data("tokenizer.model"),
            "upstream": config["corpus"]["path"],
        }
    if config["corpus"]["source"] == "hub_shards":
        return {"tokenizer": data("tokenizer.model"), "upstream": data("hub_shards")}
    return {
        "tokenizer": data("tokenizer.model"),
        "docs": data("docs.jsonl"),
        "corpus": data("docs.json"),
    }


def artifact_code():
    """The artifact stage's code, with the optional codec it packs with (imported by name, so
    the import closure cannot see it)."""
    codec = config["pack"]["matrix_codec"]
    extra = [] if codec == "gptq" else [f"src/pgolf/quant/{codec}.py"]
    return stage_code("artifact.py", *extra)


def export_spec():
    """What the exported train_gpt.py freezes in (pgolf.bundle, pgolf.standalone): the sections
    its stages read, the submission's eval mode with that mode's eval slices, and the seeds.
    """
    settings = submission_settings()
    mode = settings["mode"]
    if mode == "prequant":
        raise config_error(
            "submission.mode = 'prequant': the exported train_gpt.py scores the packed "
            "artifact; choose roundtrip, sliding, ttt or phased_ttt"
        )
    spec = json.loads(train_spec())
    for name in ("scores", "manifest", "hessian", "gptq", "pack", "lqer"):
        spec[name] = config[name]
    return {
        **spec,
        **json.loads(eval_spec(mode)),  # eval, ttt, and lora_ttt for phased_ttt
        "mode": mode,
        "run": RUN,
        "seeds": settings["seeds"],
    }


def export_code_bytes():
    """The exported train_gpt.py's size (exact: its allocation field has a fixed width), once
    per DAG build: what the challenge budget and the size gate count as code bytes."""
    return code_bytes(export_spec(), names=MATRICES, src=SRC)


def sweep_params(*keys):
    """The sweep settings a job reads: a change to another key must not rerun it."""
    return {key: config["sweep"][key] for key in keys}


def sweep_inputs(wildcards):
    """What every sweep job reads: weights, Hessians, the subset and its float baseline."""
    return {
        name: path.format(seed=wildcards.seed)
        for name, path in {
            "model": seed_path("model.safetensors"),
            "hessians": seed_path("hessians.safetensors"),
            "shards": data("shards"),
            "tokenizer": data("tokenizer.model"),
            "baseline": seed_path("sweep_baseline.parquet"),
        }.items()
    }


def rd_reference():
    """The policy whose artifact sets rd's budget ("policy:<name>"), or None."""
    budget = str(config["allocate"]["rd"]["budget"])
    return budget.removeprefix("policy:") if budget.startswith("policy:") else None


def allocate_inputs(wildcards):
    inputs = {
        "model": seed_path("model.safetensors"),
        "sensitivity": seed_path("sensitivity.parquet"),
    }
    reference = rd_reference() if wildcards.policy == "rd" else None
    if reference:
        inputs["ref_allocation"] = seed_path(f"alloc/{reference}.json")
        inputs["ref_artifact"] = seed_path(f"artifact/{reference}.json")
    return {name: path.format(seed=wildcards.seed) for name, path in inputs.items()}


def allocate_params(wildcards):
    """Only the policy's own slice: a change to rd's budget must not rerun uniform."""
    params = dict(config["allocate"].get(wildcards.policy, {}))
    if wildcards.policy == "rd" and params.get("budget") == "challenge":
        params["limit_bytes"] = config["pack"]["limit_bytes"]
        params["code_bytes"] = CODE["bytes"]
    return params


def train_threads():
    """CPU threads per training job: the cores shared by the seeds, so they train side by side
    (on 2 cores two 1-thread jobs finish ~20% sooner than one 2-thread job after the other).
    """
    try:
        cores = workflow.cores
    except WorkflowError:  # --report and --lint give no core count; they run no job
        cores = None
    return max(1, (cores or 1) // len(SEEDS))


def analysis_report(name):
    """A per-seed analysis figure in the report, with its caption."""
    return report(
        seed_path(f"analysis/{name}.png"),
        caption=f"captions/{name}.rst",
        category="Analysis",
        subcategory="seed {seed}",
    )


def analysis_windows():
    return {key: config["analysis"][key] for key in ("windows", "batch_seqs")}


def analysis_targets():
    """Every analysis that applies to this run: loops need looped layers, damage needs the
    prequant and roundtrip modes, skips skip connections, cross-seed Procrustes two seeds.
    """
    applies = {
        "outliers": True,
        "procrustes_layers": True,
        "generation": True,
        "skips": config["model"].get("skips", True),
        "loops": config["model"].get("num_loops"),
        "damage": {"prequant", "roundtrip"} <= set(config["eval"]["modes"]),
    }
    names = [name for name, ok in applies.items() if ok]
    targets = expand(seed_path("analysis/{name}.parquet"), seed=SEEDS, name=names)
    if len(SEEDS) > 1:
        targets.append(f"results/{RUN}/analysis/procrustes_seeds.parquet")
    return targets


# The exported train_gpt.py's size, counted once per DAG build (after every helper is defined).
CODE = export_code_bytes()
