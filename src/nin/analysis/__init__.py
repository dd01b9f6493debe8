"""Looking at models and machines: per-layer profiles, measured memory, speed benchmarks, the chapter's
own way of training for comparison (:mod:`~nin.analysis.seed_way`), ``nin doctor`` and benchmark records.
"""
