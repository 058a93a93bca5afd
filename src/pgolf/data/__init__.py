"""Data stages: corpus, tokenizer, shards, window scores, curriculum manifest."""
