"""Run an experiment: `python launch.py [group=option ...] [key=value ...] [--seed.style=flags ...]`.

See README.md; `python launch.py --help` lists the config groups.
"""

from autodeploy.cli import main

if __name__ == "__main__":
    main()
