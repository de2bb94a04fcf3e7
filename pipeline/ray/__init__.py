"""Ray: the only package that imports `ray`, and nothing in it that does not. Connecting to (or starting) a
cluster (cluster.py), checking that every node sees the driver's shared folders (storage.py), running
`pipeline.train.train` in a Tune trial or Ray Train workers (trainer.py), and the one Tuner builder with its
trainables and progress callback (tune.py) and the Optuna searcher adapter (searcher.py).

`ray` itself is imported inside the functions that need it, so importing this package stays cheap.
"""
