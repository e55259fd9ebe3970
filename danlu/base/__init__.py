"""The bottom layer: config building, fsspec paths and I/O, TPU facts. Imports nothing of danlu's above it."""
