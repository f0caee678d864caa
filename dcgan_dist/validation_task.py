"""Ray Train's validation task, reached through a module that imports nothing.

Why a module of its own: Ray pickles the task's function by name, and Ray Train's controller unpickles it with the
run's settings, only to hand it on to the task. Named from `dcgan_dist.evaluation`, it made every controller import
our training modules, MLflow and the metrics (about 1.2 CPU-seconds a start, on the head node); the task imports
them when it runs.
"""


def score_checkpoint(checkpoint, config: dict, run_id: str, driver_ip: str) -> dict:
    """`evaluation.score_checkpoint`, imported where it runs."""
    from dcgan_dist import evaluation

    return evaluation.score_checkpoint(checkpoint, config, run_id, driver_ip)
