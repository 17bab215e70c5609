"""Data: synthetic token streams now; tokenizers, shards and packing come next."""
