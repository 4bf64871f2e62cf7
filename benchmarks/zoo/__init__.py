"""Data, tokenizer and training code for the mambalrp model zoo.

``python -m benchmarks.zoo.train --all`` rebuilds every checkpoint under ``mambalrp/assets/zoo/``.
"""
