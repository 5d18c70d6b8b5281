"""A worker rank prints only what is its own, prefixed with its rank (not every warning N times)."""

import logging

from autodeploy.distributed.ranks import worker_logging


def test_worker_prints_its_own_records_with_a_rank_prefix(capsys):
    logger = logging.getLogger("autodeploy")
    saved = (logger.handlers[:], logger.propagate, logger.level)
    try:
        worker_logging(3)
        logging.getLogger("autodeploy.models.factory").warning("max_seq_len=9000 exceeds the model's positions")
        logging.getLogger("autodeploy.distributed.collectives").warning("gloo group slow to form")
        logging.getLogger("autodeploy.build").error("weights of layer 2 do not fit")
        logging.getLogger("autodeploy.build").info("built in 1.0s")
    finally:
        logger.handlers[:], logger.propagate, logger.level = saved[0], saved[1], saved[2]
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "[rank 3] WARNING autodeploy.distributed.collectives: gloo group slow to form",
        "[rank 3] ERROR autodeploy.build: weights of layer 2 do not fit",
    ]  # the factory's warning is the same on every rank: rank 0 reports it once
