"""`python launch.py <args> --cfg job` for every seed and README example, byte for byte as recorded.

The goldens (tests/config/golden/<name>.yaml, written through the real CLI by make_goldens.py) pin
the seed's behaviour: precedence, deep merge, cards named in files, shortcuts. Here the same CLI
entry runs in-process, which is what keeps this test fast.
"""

import sys
from pathlib import Path

import pytest

from autodeploy.cli import main

GOLDEN = Path(__file__).parent / "golden"
sys.path.insert(0, str(GOLDEN))
from make_goldens import ROOT, cases  # noqa: E402

CASES = cases()


@pytest.mark.parametrize("name,argv", CASES, ids=[name for name, _ in CASES])
def test_cfg_job_matches_golden(name, argv, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the cases name their input files relative to the repository root
    main([*argv, "--cfg", "job"])
    assert capsys.readouterr().out == (GOLDEN / f"{name}.yaml").read_text()
