"""The CI guards themselves must be able to fail: a package out of step with its notebooks, or a
notebook committed with outputs, makes tools/check_sync.py exit 1."""
import json, shutil, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture
def repo_copy(tmp_path):
    for name in ('nbs', 'ipfacediff', 'tools'):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns('__pycache__', '.ipynb_checkpoints'))
    shutil.copy(ROOT / 'settings.ini', tmp_path / 'settings.ini')
    return tmp_path

def check(path):
    return subprocess.run([sys.executable, 'tools/check_sync.py'], cwd=path, capture_output=True, text=True, timeout=600)

def edit_nb(path, fn):
    nb = json.loads(path.read_text()); fn(nb); path.write_text(json.dumps(nb, indent=1) + '\n')

def test_clean_tree_passes(repo_copy):
    r = check(repo_copy)
    assert r.returncode == 0, r.stdout + r.stderr

def test_package_out_of_step_fails(repo_copy):
    (repo_copy / 'ipfacediff' / 'utils.py').write_text((repo_copy / 'ipfacediff' / 'utils.py').read_text() + '\n# edited by hand\n')
    r = check(repo_copy)
    assert r.returncode == 1 and 'ipfacediff/utils.py' in r.stdout and 'out of step' in r.stdout

def test_notebook_with_outputs_fails(repo_copy):
    def add_output(nb):
        cell = next(c for c in nb['cells'] if c['cell_type'] == 'code')
        cell['outputs'] = [{'output_type': 'stream', 'name': 'stdout', 'text': ['hello\n']}]
        cell['execution_count'] = 3
    edit_nb(repo_copy / 'nbs' / '00a_utils.ipynb', add_output)
    r = check(repo_copy)
    assert r.returncode == 1 and 'nbs/00a_utils.ipynb' in r.stdout and 'nbdev_clean' in r.stdout
