"""Sweeps: failure isolation per job, the sweep summary, and the submitit launchers.

Every job folder of a sweep ends with ``results.json`` (the job ran) or ``failure.json`` (it
failed: its error, written by the job itself or, when its process died, by the launcher). The
summary (``summary.csv``, ``summary.md``, ``summary.png``) is built from those files alone, so it
works for every launcher and for a sweep folder copied from a cluster.

Nothing here imports torch, matplotlib or submitit at module level: Hydra instantiates the
callback and submitit unpickles the launcher in every job process.
"""
