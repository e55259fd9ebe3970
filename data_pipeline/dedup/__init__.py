"""Corpus-level deduplication and decontamination.

minhash   shingles, MinHash signatures, LSH band keys, bands × rows from a threshold
lsh       buckets → edges → connected components → kept document per cluster
spill     band-key records beyond a memory budget: sorted run files, k-way merged
fuzzy     the fuzzy dedup driver (streaming, bounded memory, optional verification)
exact     exact text, URL and line/paragraph dedup
decontam  evaluation-set n-gram overlap removal
stages    corpus-level stages of a cleaning job (after the per-document steps)
"""
