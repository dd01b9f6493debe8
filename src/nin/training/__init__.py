"""Training: the run configuration (:mod:`~nin.training.config`), the trainer (:mod:`~nin.training.trainer`),
its callbacks (:mod:`~nin.training.callbacks`), checkpoints, distributed runs, and the wiring from a
config to a finished run directory (:mod:`~nin.training.run`).
"""
