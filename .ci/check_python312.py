"""Python 3.12 compatibility without torch: byte-compile every module (syntax warnings are errors), then import every
module of the package, where the only acceptable failure is a missing heavy dependency (ALLOWED_MISSING).

Run by .ci/run under python3.12 when no CPU build of torch exists for it; prints one line per finding, exits 1 on any.
"""

import importlib
import pathlib
import py_compile
import sys
import tempfile
import warnings

PACKAGES = ("rl", "actors", "rewards", "rollout", "quant", "solray")
ALLOWED_MISSING = {"torch", "ray", "deepspeed"}  # torch: no CPU wheel for this Python here; ray, deepspeed: import torch / large
ROOT = pathlib.Path(__file__).resolve().parents[1]


def main() -> int:
    sys.path.insert(0, str(ROOT))
    files = sorted(path for path in ROOT.rglob("*.py") if ".git" not in path.parts and "venv" not in str(path))
    problems = []
    with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
        warnings.simplefilter("error", SyntaxWarning)  # 3.12 turned invalid escapes into SyntaxWarnings
        for path in files:
            try:
                py_compile.compile(str(path), cfile=f"{scratch}/{len(problems)}.pyc", doraise=True)
            except py_compile.PyCompileError as error:
                problems.append(f"compile {path.relative_to(ROOT)}: {error.msg}")
    modules = sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
    )
    imported, stopped_at = [], {}
    for module in modules:
        try:
            importlib.import_module(module)
            imported.append(module)
        except ModuleNotFoundError as error:
            if error.name in ALLOWED_MISSING:
                stopped_at[error.name] = stopped_at.get(error.name, 0) + 1
            else:
                problems.append(f"import {module}: {error}")
        except Exception as error:  # any other failure at import is a 3.12 incompatibility
            problems.append(f"import {module}: {type(error).__name__}: {error}")
    version = ".".join(map(str, sys.version_info[:3]))
    print(
        f"python {version}: {len(files)} files byte-compiled; {len(imported)} of {len(modules)} modules imported, "
        f"the others stop at a missing {', '.join(f'{name} ({count})' for name, count in sorted(stopped_at.items()))}"
    )
    for problem in problems:
        print(f"python {version}: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
