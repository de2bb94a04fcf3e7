"""Runs and their folders, below the stages that train and drive them: the one-writer lock of a folder
(lock.py, held by `train` and by the drivers' leases, lease.py), what one run asks of a cluster
(resources.py), where a driver's outputs live (outputs.py), the markers of a run's trial attempts
(markers.py), where a driver's wall time went (timing.py) and the progress board (progress.py). Nothing here imports `ray`.
"""
