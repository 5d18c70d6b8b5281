"""Multi-rank runs: rank environments, process groups, collective ops, spawned workers."""
