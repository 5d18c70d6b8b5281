"""A fake SLURM for tests: ``sbatch``, ``srun`` and ``sacct`` that run the jobs on this machine.

``sbatch SCRIPT`` keeps a copy of the script (``$FAKE_SLURM_DIR/sbatch_<id>.sh``), answers
"Submitted batch job <id>" and, in the background, runs each array task of the script with the
environment SLURM gives a job. ``srun`` starts ``SLURM_NTASKS`` copies of its command with
``SLURM_PROCID``/``SLURM_LOCALID`` set and the output files named as SLURM names them. ``sacct``
reports what the background runner recorded. One node only. ``FAKE_SLURM_KILL=1,3`` makes the
steps of those array tasks (`-`: a job that is no array) die at once, as an OOM kill does.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

STATE = Path(os.environ.get("FAKE_SLURM_DIR", "."))


def sbatch(argv: list[str]) -> int:
    script = Path(argv[-1])
    text = script.read_text()
    STATE.mkdir(parents=True, exist_ok=True)
    job_id = str(4000 + len(list(STATE.glob("sbatch_*.sh"))))
    (STATE / f"sbatch_{job_id}.sh").write_text(text)
    print(f"Submitted batch job {job_id}", flush=True)
    # the jobs start once submitit has moved their pickles in place, after this command returns
    subprocess.Popen([sys.executable, __file__, "run", job_id, str(script)], start_new_session=True,
                     stdout=open(STATE / f"runner_{job_id}.log", "w"), stderr=subprocess.STDOUT)
    return 0


def _flags(text: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", text, re.M))


def _expand(pattern: str, env: dict[str, str]) -> str:
    array = "SLURM_ARRAY_JOB_ID" in env
    return (pattern.replace("%A", env.get("SLURM_ARRAY_JOB_ID", env["SLURM_JOB_ID"]))
            .replace("%a", env.get("SLURM_ARRAY_TASK_ID", "0"))
            .replace("%j", f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}" if array else env["SLURM_JOB_ID"])
            .replace("%t", env.get("SLURM_PROCID", "0")))


def run(job_id: str, script: str) -> int:
    text = Path(script).read_text()
    flags = _flags(text)
    tasks = int(flags.get("nodes", 1)) * int(flags.get("ntasks-per-node", 1))
    indices = [None]
    if "array" in flags:
        first, last = flags["array"].split("%")[0].split("-")
        indices = list(range(int(first), int(last) + 1))
    for index in indices:
        env = dict(os.environ, SLURM_JOB_ID=job_id, SLURM_NTASKS=str(tasks), SLURM_JOB_NUM_NODES=flags.get("nodes", "1"),
                   SLURM_NTASKS_PER_NODE=flags.get("ntasks-per-node", "1"), SLURM_NODEID="0",
                   SLURM_JOB_NODELIST="localhost", SLURM_PROCID="0")
        name = job_id
        if index is not None:
            env.update(SLURM_ARRAY_JOB_ID=job_id, SLURM_ARRAY_TASK_ID=str(index))
            name = f"{job_id}_{index}"
        # wait for submitit's pickle: <folder of --output>/<id>_submitted.pkl
        pickle = Path(_expand(flags["output"], env)).parent / f"{name}_submitted.pkl"
        deadline = time.time() + 60
        while not pickle.exists() and time.time() < deadline:
            time.sleep(0.2)
        (STATE / f"state_{name}").write_text("RUNNING")
        rc = subprocess.call(["bash", script], env=env)
        (STATE / f"state_{name}").write_text("COMPLETED" if rc == 0 else "FAILED")
    return 0


def srun(argv: list[str]) -> int:
    out = err = None
    i = 0
    while i < len(argv) and argv[i].startswith("--"):
        if argv[i] in ("--output", "--error"):
            out, err = (argv[i + 1], err) if argv[i] == "--output" else (out, argv[i + 1])
            i += 2
        else:
            i += 1
    command = argv[i:]
    if os.environ.get("SLURM_ARRAY_TASK_ID", "-") in os.environ.get("FAKE_SLURM_KILL", "").split(","):
        # the node killed the step before it wrote a result (as SLURM's OOM killer does)
        with open(_expand(err, dict(os.environ, SLURM_PROCID="0")), "a") as f:
            f.write("slurmstepd: error: Detected 1 oom-kill event(s) in StepId=fake. Some of your processes "
                    "may have been killed by the cgroup out-of-memory handler.\n")
        return 137
    procs = []
    for task in range(int(os.environ.get("SLURM_NTASKS", "1"))):
        env = dict(os.environ, SLURM_PROCID=str(task), SLURM_LOCALID=str(task))
        stdout = open(_expand(out, env), "a") if out else None
        stderr = open(_expand(err, env), "a") if err else None
        procs.append(subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr))
    return max(p.wait() for p in procs)


def sacct(argv: list[str]) -> int:
    ids = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-j"]
    print("JobID|State|NodeList")
    for job in ids:
        states = sorted(STATE.glob(f"state_{job}_*")) + sorted(STATE.glob(f"state_{job}"))
        for state in states:
            print(f"{state.name[len('state_'):]}|{state.read_text()}|localhost")
        if not states:
            print(f"{job}|PENDING|localhost")
    return 0


COMMANDS = {"sbatch": sbatch, "srun": srun, "sacct": sacct}


def install(bin_dir: Path) -> None:
    """Executables ``sbatch``, ``srun``, ``sacct`` (and a no-op ``scancel``) in ``bin_dir``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in (*COMMANDS, "scancel"):
        exe = bin_dir / name
        exe.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                       f"from fake_slurm import main\nsys.exit(main({name!r}, sys.argv[1:]))\n")
        exe.chmod(0o755)


def main(command: str, argv: list[str]) -> int:
    return COMMANDS[command](argv) if command in COMMANDS else 0


if __name__ == "__main__":  # the background runner
    sys.exit(run(sys.argv[2], sys.argv[3]))
