"""Step 8's evaluation engine, apart from its command line: what a run is (`plan.py`: Job, Plan, Settings), how it
runs (`engine.py`: run_evaluation, the batches, the attacks, the judging of each PNG read back), the files it writes
(`results.py`: results.csv, the shards, --resume; `report.py`: summary.md, robust_accuracy.csv, the figures), the
sanity checks (`checks.py`), running as several processes (`distributed.py`) and the reference AutoAttack it is
checked against (`reference.py`); and `robust_accuracy` (`robust.py`), the evaluation as one library call on images
in memory: step 8's ensemble and verdicts without its files.

    from utils.evaluation import robust_accuracy
    result = robust_accuracy(model, images_u8, labels, norm="Linf", epsilon=8)
    print(result.clean_accuracy, result.robust_accuracy, result.per_attack)
"""
__all__ = ["RobustAccuracy", "robust_accuracy"]


def __getattr__(name):
    """`from utils.evaluation import robust_accuracy` imports robust.py (the engine, the certifiers' names) on first
    use only: a program that imports one light module of this package (distributed.py, plan.py) does not pay for it."""
    if name in __all__:
        from utils.evaluation import robust
        return getattr(robust, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
