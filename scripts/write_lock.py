"""Write the lock (pip constraints) from this interpreter's installed packages: `make test-latest` runs it
once the suite has passed on them. torch is left out (the Makefile's TORCH_SPEC picks the build)."""

from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

LEFT_OUT = ("torch", "pip", "setuptools", "wheel", "autodeploy")


def main(path: str) -> None:
    frozen = subprocess.run([sys.executable, "-m", "pip", "list", "--format=freeze", "--exclude-editable"],
                            check=True, capture_output=True, text=True).stdout.splitlines()
    pins = sorted((line for line in frozen if line.split("==")[0].lower() not in LEFT_OUT and not
                   line.lower().startswith("nvidia-")), key=str.lower)
    header = (f"# The versions `make test` installs: written by `make test-latest` on {datetime.date.today()}, "
              f"after the CPU suite passed on them\n# (Python {sys.version.split()[0]}). torch comes from the "
              "Makefile's TORCH_SPEC. Edit pyproject.toml's ranges, not this file.\n")
    Path(path).write_text(header + "\n".join(pins) + "\n")
    print(f"wrote {path}: {len(pins)} pins")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "constraints.txt")
