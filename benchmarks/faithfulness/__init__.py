"""Faithfulness and conservation benchmark suite for MambaLRP.

Modules:
    methods: attribution methods compared (random, gradient-based, perturbation-based,
        hidden-attention rollouts, LRP variants and MambaLRP ablations).
    metrics: input flipping / insertion curves and areas, conservation statistics, ground-truth
        hit rates.
    tasks: the models and inputs the suite runs on (zoo models, or a tiny model trained on the fly).
    runner: the command-line entry point (``python -m benchmarks.suite``).
"""
