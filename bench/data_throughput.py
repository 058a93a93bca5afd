"""Throughput of the data stages on the bundled demo corpus: tokenization and window scoring.

    python bench/data_throughput.py [--threads N] [--vocab 1024] [--seq-len 256]

Prints MB/s of UTF-8 text for tokenizer training, shard encoding (1 thread and N threads, side by
side) and both window scorers. Figures depend on the machine; nothing here asserts a number.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

from pgolf.data.corpus import CorpusConfig, build_corpus, read_jsonl
from pgolf.data.encode import ShardsConfig, encode_corpus
from pgolf.data.scores import ScoresConfig, score_windows
from pgolf.data.tokenizer import TokenizerConfig, docs_for_training, train_tokenizer
from pgolf.io import read_json

DEMO = Path(__file__).resolve().parents[1] / "data" / "sotu.jsonl.xz"


def timed(fn, warmup: bool = False):
    if warmup:  # page cache, imports and worker start-up are not throughput
        fn()
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pgolf-bench-"))
    docs, meta = work / "docs.jsonl", work / "docs.json"
    corpus, _ = timed(lambda: build_corpus(CorpusConfig(), demo=DEMO, out=docs, meta=meta))
    megabytes = corpus["text_bytes"] / 1e6
    texts = list(read_jsonl(docs))
    train_mb = sum(len(t.encode()) for t in texts[11:]) / 1e6
    tok = work / "tok.model"
    _, seconds = timed(lambda: train_tokenizer(
        docs_for_training(texts, val_docs=11, include_val=False), tok,
        cfg=TokenizerConfig(vocab_size=args.vocab), threads=args.threads))
    print(f"corpus: {corpus['count']} documents, {megabytes:.2f} MB; threads={args.threads}")
    report("tokenizer training", train_mb, seconds)
    shards = {}
    for threads in sorted({1, args.threads}):
        out = work / f"shards{threads}"
        shards[threads], seconds = timed(lambda out=out, t=threads: encode_corpus(
            docs, tok, out, cfg=ShardsConfig(val_docs=11), corpus=read_json(meta), threads=t),
            warmup=True)
        report(f"encode, {threads} thread(s)", megabytes, seconds)
    train = shards[args.threads]["splits"]["train"]
    train_mb = train["text_bytes"] / 1e6
    for scorer in ("unigram", "zstd"):
        for threads in sorted({1, args.threads}):
            _, seconds = timed(lambda s=scorer, t=threads: score_windows(
                work / f"shards{args.threads}", tok, work / f"{s}.parquet",
                cfg=ScoresConfig(scorer=s), seq_len=args.seq_len, vocab_size=args.vocab,
                threads=t), warmup=True)
            report(f"score {scorer}, {threads} thread(s)", train_mb, seconds,
                   extra=f"{train['tokens'] / seconds / 1e6:.2f} M tokens/s")


def report(what: str, megabytes: float, seconds: float, extra: str = "") -> None:
    print(f"{what:32s} {seconds:7.2f} s  {megabytes / seconds:8.2f} MB/s  {extra}")


if __name__ == "__main__":
    main()
