"""Runs hostile CLI cases in one fresh interpreter, capturing each case's real stderr (fd 2).

Usage: python _hostile_worker.py SPEC.json RESULTS.json. SPEC holds the workspace and the cases;
for each case the file tree of the workspace is hashed before and after.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _reliability import tree_hash  # noqa: E402


def run_case(argv: list[str], err_path: Path) -> object:
    from mpdeploy.cli import main

    with open(err_path, "wb") as err:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            return main(argv)
        except BaseException as exc:  # what a user would see as a traceback
            traceback.print_exc()
            return f"raised {type(exc).__name__}"
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    workspace, scratch = Path(spec["workspace"]), Path(spec["scratch"])
    os.chdir(workspace)
    results = {}
    for case in spec["cases"]:
        before = tree_hash(workspace)
        err_path = scratch / f"{case['id']}.stderr"
        start = time.perf_counter()
        code = run_case(case["argv"], err_path)
        results[case["id"]] = {
            "seconds": round(time.perf_counter() - start, 3),
            "code": code,
            "stderr": err_path.read_text(errors="replace"),
            "unchanged": tree_hash(workspace) == before,
        }
    Path(sys.argv[2]).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
