"""CI guard: the package must be exactly what `nbdev_export` makes of the notebooks, and the
notebooks must be committed clean (what `nbdev_clean` leaves). Run from the repo root; exits 1 and
says which files changed if either check fails.
"""
import hashlib, subprocess, sys
from pathlib import Path

def snapshot(folder: str, pattern: str) -> dict[str, str]:
    "File path → sha256 of its bytes, for every file matching `pattern` under `folder`."
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).rglob(pattern))
            if '.ipynb_checkpoints' not in p.parts}

def changed(before: dict, after: dict) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))

def check(folder: str, pattern: str, cmd: list[str], what: str) -> bool:
    before = snapshot(folder, pattern)
    subprocess.run(cmd, check=True)
    diff = changed(before, snapshot(folder, pattern))
    if diff:
        print(f'FAIL: `{" ".join(cmd)}` changed {len(diff)} file(s) — {what}:')
        for f in diff: print(f'   {f}')
    else: print(f'ok: `{" ".join(cmd)}` changed nothing in {folder}/')
    return not diff

def main() -> int:
    bindir = Path(sys.executable).parent
    ok_export = check('ipfacediff', '*.py', [str(bindir / 'nbdev_export')],
                      'the package is out of step with the notebooks; run nbdev_export and commit ipfacediff/')
    ok_clean = check('nbs', '*.ipynb', [str(bindir / 'nbdev_clean')],
                     'notebooks were committed with outputs or metadata; run nbdev_clean and commit nbs/')
    return 0 if ok_export and ok_clean else 1

if __name__ == '__main__': sys.exit(main())
