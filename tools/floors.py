"""The declared floors, tested: install the lowest version pyproject.toml admits of every dependency that has a
floor (the core ones and the train and serve extras; torch and the build toolchain excepted: the project
venv's torch is used) into a venv of their own, and print the pip line. `make test-floors` then runs the unit
tier there. A floor that pip cannot install beside the others (a conflict) fails here, naming it.

    python tools/floors.py VENV PROJECT_PYTHON

The new venv reads what it does not install itself (torch, pytest, …) from the project venv: a .pth file puts
that venv's site-packages after its own on sys.path."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("train", "serve")
NOT_HERE = {"torch"}  # the project venv's build: the CPU suite's torch, and the extension is built against it


def floors():
    """{name: floor} of every requirement of the project and EXTRAS written NAME>=VERSION."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [r for e in EXTRAS for r in project["optional-dependencies"][e]]
    out = {}
    for req in reqs:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-\[\]]+)\s*>=\s*([0-9][^,;\s]*)\s*", req)
        if m and m.group(1) not in NOT_HERE:
            out[m.group(1)] = m.group(2)
    return out


def purelib(python):
    return subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()


def main():
    venv, project_python = Path(sys.argv[1]), sys.argv[2]
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    Path(purelib(python), "zz_project_venv.pth").write_text(purelib(project_python) + "\n")
    pins = [f"{name}=={version}" for name, version in sorted(floors().items())]
    print("floors:", " ".join(pins), flush=True)
    res = subprocess.run([python, "-m", "pip", "install", "-q", *pins], capture_output=True, text=True)
    errors = [line for line in (res.stdout + res.stderr).splitlines() if "is ignored" not in line]
    if res.returncode != 0:
        print("\n".join(errors[-30:]), file=sys.stderr)
        sys.exit(f"the declared floors cannot be installed together ({' '.join(pins)}): raise the one pip names "
                 f"in pyproject.toml")
    from packaging.version import Version

    want = floors()
    got = subprocess.run([python, "-c", "import importlib.metadata as m, sys; print(' '.join(m.version(n) "
                          "for n in sys.argv[1:]))", *want], check=True, capture_output=True, text=True).stdout.split()
    print("installed:", " ".join(f"{n}=={v}" for n, v in zip(want, got)), flush=True)
    wrong = [f"{n} {v} (floor {want[n]})" for n, v in zip(want, got) if Version(v) != Version(want[n])]
    if wrong:
        sys.exit(f"the floors venv does not hold the floors: {', '.join(wrong)}")


if __name__ == "__main__":
    main()
