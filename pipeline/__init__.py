"""Data and run stages of relalign: shards, tokenizer, loader, training, evaluation, tracking."""
