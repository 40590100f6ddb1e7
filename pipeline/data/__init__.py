"""Data: shards (write, list, count), sources, synthetic scenes, tokenizer, decoding, the streaming loader and
the in-memory evaluation split."""
