"""Names every layer of megafusion may import: modalities, the error classes, file writes and
digests, and the choice lists that config validation and the code both read. Nothing here
imports torch, megatron-core or another megafusion package."""
