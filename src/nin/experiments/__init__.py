"""Experiments over many runs: the chapter's exercises as studies over seeds (:mod:`~nin.experiments.study`)
and hyperparameter search (:mod:`~nin.experiments.tune`).
"""
