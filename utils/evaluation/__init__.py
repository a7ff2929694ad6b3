"""Step 8's evaluation engine, apart from its command line: what a run is (`plan.py`: Job, Plan, Settings), how it
runs (`engine.py`: run_evaluation, the batches, the attacks, the judging of each PNG read back), the files it writes
(`results.py`: results.csv, the shards, --resume; `report.py`: summary.md, robust_accuracy.csv, the figures), the
sanity checks (`checks.py`), running as several processes (`distributed.py`) and the reference AutoAttack it is
checked against (`reference.py`)."""
