"""Every command on a full disk: a one-line error naming the user's file (exit 1), or a warning where only a
cache could not be written; never a traceback, a truncated output, or a temporary file left behind.

The full disk is a file-size limit (`ulimit -f`) set in the child process: a write past it fails with EFBIG."""
import os, resource, shutil, subprocess, sys
from pathlib import Path
import numpy as np, pytest

from ipfacediff.utils import data_path

EXE = shutil.which('ipfacediff') or str(Path(sys.executable).parent / 'ipfacediff')

def run_full(args, kib, tmp_path, cache=None, timeout=300):
    "`ipfacediff ARGS` in `tmp_path` with writes past `kib` KiB failing."
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1', 'IPFACEDIFF_CACHE': str(cache or tmp_path / 'cache')}
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (kib * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout, cwd=tmp_path, preexec_fn=limit)

def one_line_error(r) -> str:
    "The CLI's error line, after checking there is no traceback and exit code 1."
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith('ipfacediff: error: '), r.stderr[-3000:]
    return last

def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob('*') if p.is_file())

@pytest.mark.parametrize('name', ['d.jpg', 'd.pdf', 'd.png'])
def test_ddim_demo_figure(tmp_path, name):
    "A JPEG came out truncated with exit 0, a PDF failed with matplotlib's AttributeError over the OSError."
    r = run_full(['ddim-demo', '--out', name], 2, tmp_path)
    assert one_line_error(r) == f'ipfacediff: error: File too large: {name}'
    assert files(tmp_path) == []

def test_edit_caches_warn_and_the_video_error_names_the_users_file(tmp_path):
    args = ['edit', data_path('sample.mp4'), '--prompt', 'add glasses', '--tiny', '--max-frames', '4', '--steps', '2',
            '--out', 'out.mp4', '--side-by-side', 'sbs.mp4', '--quiet']
    r = run_full(args, 4, tmp_path)
    assert one_line_error(r) == 'ipfacediff: error: File too large: out.mp4'        # not a hidden temporary's name
    for what in ('face-track', 'inversion'):                                          # the caches: warnings, the edit went on
        assert f'could not write the {what} cache file' in r.stderr, r.stderr[-3000:]
    assert files(tmp_path) == []                                                      # no partial video, no partial cache

def test_bench_json(tmp_path):
    args = ['bench', '--config', 'tiny', '--frames', '1', '--size', '64', '--steps', '1', '--inversion-steps', '1',
            '--no-warmup', '--no-write', '--quiet', '--json', 'r.json']
    r = run_full(args, 1, tmp_path)
    assert one_line_error(r) == 'ipfacediff: error: File too large: r.json'
    assert files(tmp_path) == []
    import ipfacediff                       # the report's commit comes from `git status`, which must not lock the checkout's index
    assert not (Path(ipfacediff.__file__).resolve().parent.parent / '.git' / 'index.lock').exists()

def test_ablations_tiny_model_save(tmp_path):
    "The tiny study saves its random SD components first: safetensors' SafetensorError was a traceback."
    r = run_full(['ablations', data_path('sample.mp4'), '--prompt', 'add glasses', '--tiny', '--out', 'study', '--configs', 'base,full',
                  '--quiet'], 2, tmp_path)
    line = one_line_error(r)
    assert line.startswith('ipfacediff: error: File too large: ') and '/unet' in line, line
    assert files(tmp_path) == []

def test_evaluate_leaves_no_partial_cache_file(tmp_path):
    "The embedding cache's temporary file was left behind (a truncated tmpXXXX.npz per failed run)."
    for d in ('orig', 'ed'):
        (tmp_path / d).mkdir(); shutil.copy(data_path('sample.mp4'), tmp_path / d / 'clip.mp4')
    r = run_full(['evaluate', '--original', 'orig', '--edited', 'ed', '--max-frames', '6', '--cache-dir', 'emb', '--out', 'm', '--quiet'],
                 2, tmp_path)
    assert one_line_error(r).startswith('ipfacediff: error: File too large: m'), r.stderr[-3000:]
    assert 'could not write the embedding cache file' in r.stderr, r.stderr[-3000:]
    # the warp error's file (5 numbers) fits under the limit: a whole one, shared by the original and its byte-for-byte copy
    warp = [f for f in files(tmp_path) if f.startswith('emb/warp-')]
    assert len(warp) == 1 and all(len(np.load(tmp_path / f)['errors']) == 5 for f in warp), warp
    assert [f for f in files(tmp_path) if f not in warp] == ['ed/clip.mp4', 'orig/clip.mp4']
