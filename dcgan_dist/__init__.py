"""dcgan-dist: the DCGAN paper as distributed software (Ray Train DDP, WebDataset shards, MLflow)."""

__version__ = "0.1.0"
