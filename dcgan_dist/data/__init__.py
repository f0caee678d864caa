"""Data plane: sources -> preprocessing -> WebDataset tar shards + manifest -> a per-rank stream."""
