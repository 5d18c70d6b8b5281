"""Write tests/config/golden/<name>.yaml: `python launch.py <args> --cfg job` through the real CLI.

Run from the repository root only to (re)record the goldens: `.venv/bin/python tests/config/golden/make_goldens.py`.
"""

import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]


def cases() -> list[tuple[str, list[str]]]:
    out = []
    for line in (HERE / "cases.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, args = line.partition("|")
            out.append((name.strip(), shlex.split(args)))
    return out


if __name__ == "__main__":
    only = set(sys.argv[1:])
    for name, argv in cases():
        if only and name not in only:
            continue
        proc = subprocess.run([sys.executable, "launch.py", *argv, "--cfg", "job"], cwd=ROOT, capture_output=True,
                              text=True, env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
        if proc.returncode != 0:
            sys.exit(f"{name}: exit {proc.returncode}\n{proc.stderr}")
        (HERE / f"{name}.yaml").write_text(proc.stdout)
        print(name, len(proc.stdout.splitlines()), "lines")
