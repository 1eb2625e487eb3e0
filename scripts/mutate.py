"""The mutation score of each module of application/: mutmut run, then killed / total per
module and every mutant no test noticed. Configuration: pyproject.toml, [tool.mutmut];
when to run it and how to read it: tests/MUTATION.md.

    scripts/mutate                          # every mutant, from scratch
    scripts/mutate 'application.probes.*'   # test those mutants again, keep the other results
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

MUTMUT = str(Path(sys.executable).parent / "mutmut")
# mutmut's verdicts where a test noticed the mutant. A mutant that breaks `import application`
# (a collection error in every selected module) is reported by mutmut as a timeout.
NOTICED = ("killed", "timeout", "segfault")


def main(names: list[str]) -> int:
    started = time.monotonic()
    if not names:
        # mutmut keeps a verdict until its function's source changes, even when a new test
        # would now kill the mutant: a whole run starts from nothing.
        shutil.rmtree("mutants", ignore_errors=True)
    # One mutant at a time: tests assert deadlines, and a second concurrent run on two cores
    # (shared with other suites) would fail them and count as kills.
    status = subprocess.run([MUTMUT, "run", "--max-children", "1", *names], check=False)
    if status.returncode != 0:
        return status.returncode
    report(verdicts(), time.monotonic() - started)
    return 0


def verdicts() -> dict[str, str]:
    """Mutant name -> mutmut's verdict, for every mutant of the last run."""
    listing = subprocess.run(
        [MUTMUT, "results", "--all", "true"],
        capture_output=True,
        encoding="utf-8",  # names of methods carry `ǁ`
        check=True,
    ).stdout
    pairs = (line.strip().rpartition(": ") for line in listing.splitlines() if ": " in line)
    return {name: verdict for name, _, verdict in pairs}


def report(by_mutant: dict[str, str], seconds: float) -> None:
    by_module: dict[str, dict[str, str]] = defaultdict(dict)
    for name, verdict in by_mutant.items():
        # application.asgi.xǁRequestBodyǁread__mutmut_1: the function's part has no dot
        by_module[name.rpartition(".")[0]][name] = verdict
    modules = {path: by_module[_dotted(path)] for path in sorted(Path("application").rglob("*.py"))}

    print(f"\n{'module':<26} {'killed':>6} / {'total':<5} {'score':>7}  not killed")
    for path, mutants in [*modules.items(), (Path("all"), by_mutant)]:
        counts = Counter(mutants.values())
        killed = sum(counts[verdict] for verdict in NOTICED)
        score = f"{100 * killed / len(mutants):.1f} %" if mutants else "-"
        missed = ", ".join(f"{n} {v}" for v, n in sorted(counts.items()) if v not in NOTICED)
        print(f"{path!s:<26} {killed:>6} / {len(mutants):<5} {score:>7}  {missed}")
    print(f"took {seconds / 60:.1f} min")

    print("\nNot killed, by module (`.venv/bin/mutmut show NAME` prints the change):")
    for path, mutants in modules.items():
        missed = sorted((v, _numbered(n)) for n, v in mutants.items() if v not in NOTICED)
        if missed:
            print(path)
        for verdict, (function, number) in missed:
            print(f"    {verdict:<12} {function}__mutmut_{number}")


def _dotted(path: Path) -> str:
    """application/asgi.py -> application.asgi, as mutmut names the module."""
    return ".".join(path.with_suffix("").parts).removesuffix(".__init__")


def _numbered(name: str) -> tuple[str, int]:
    """A mutant's function and number, so that _2 sorts before _10."""
    function, _, number = name.rpartition("__mutmut_")
    return function, int(number)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
