"""How the tests run the `ipfacediff` command: as a real subprocess, or in this process (no second
import of torch) with the exit code and output the CLI would give."""
import os, shutil, subprocess, sys, time
from pathlib import Path

EXE = shutil.which('ipfacediff') or str(Path(sys.executable).parent / 'ipfacediff')

def run_cli(*args, cache=None, env=None, timeout=600, cwd=None) -> tuple[subprocess.CompletedProcess, float]:
    "`ipfacediff ARGS` in a subprocess (inversion cache in `cache`); returns (result, seconds)."
    e = {**os.environ, **(env or {})}
    if cache is not None: e['IPFACEDIFF_CACHE'] = str(cache)
    t0 = time.time()
    r = subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, env=e, timeout=timeout, cwd=cwd)
    return r, time.time() - t0

def run_inprocess(capsys, monkeypatch, *args, cache=None) -> subprocess.CompletedProcess:
    "`ipfacediff ARGS` through `cli.main` in this process; stdout/stderr captured."
    from ipfacediff.cli import main
    if cache is not None: monkeypatch.setenv('IPFACEDIFF_CACHE', str(cache))
    capsys.readouterr()
    rc = main([str(a) for a in args])
    o = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), rc, o.out, o.err)
