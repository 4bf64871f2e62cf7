"""Entry point of the faithfulness and conservation suite: ``python -m benchmarks.suite [--quick]``.

See :mod:`benchmarks.faithfulness.runner` for the options and outputs.
"""

from benchmarks.faithfulness.runner import main

if __name__ == "__main__":
    main()
