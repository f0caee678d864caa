"""The DCGAN paper's experiments (sections 5-6) on any registered generator/discriminator.

Each module has NAME, HELP, `add_arguments(parser)` and `run(args, nets, out) -> summary text`;
`jobs/experiments.py NAME --model models:/...` runs one, writing its figures to a folder and to an
MLflow run linked to the model version (`common.ExperimentRun`).
"""
