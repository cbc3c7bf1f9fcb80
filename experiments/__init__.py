"""The papers' claims tested at small scale: each experiment is a module run from the repository
root as ``python -m experiments.<name>`` (``--quick`` for a smoke run); results and plots go to
``experiments/results/`` and are discussed in ``experiments/RESULTS.md``."""
