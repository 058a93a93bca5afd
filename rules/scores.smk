# Window scores: one difficulty score per training window of seq_len + 1 tokens.


rule window_scores:
    input:
        shards=data("shards"),
        meta=data("shards.json"),
        tokenizer=data("tokenizer.model"),
    output:
        data("window_scores.parquet"),
    log:
        log("window_scores"),
    benchmark:
        bench("window_scores")
    conda:
        "../envs/pgolf.yaml"
    threads: 8
    params:
        scores=config["scores"],
        seq_len=config["train"]["seq_len"],
        code=stage_code("window_scores.py"),
    script:
        "../workflow_scripts/window_scores.py"
