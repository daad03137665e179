"`ipfacediff cache` on the caches a real (tiny) edit and evaluation leave: listing, pruning, and refusing bad input."
import os, shutil, subprocess, sys, time
from pathlib import Path
import pytest

from ipfacediff.cache import scan_cache
from ipfacediff.utils import data_path

EXE = shutil.which('ipfacediff') or str(Path(sys.executable).parent / 'ipfacediff')


def cli(args, cache, cwd):
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1', 'IPFACEDIFF_CACHE': str(cache)}
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


EDIT = ['edit', data_path('sample.mp4'), '--prompt', 'add glasses', '--tiny', '--max-frames', '4', '--steps', '2',
        '--inversion-steps', '2', '--size', '64', '--quiet']


@pytest.fixture(scope='module')
def edited(tmp_path_factory):
    "A cache folder after one tiny edit (a track and an inversion) and one evaluation with --cache-dir in it."
    root = tmp_path_factory.mktemp('cachecmd')
    cache = root / 'cache'
    (root / 'ed').mkdir()
    r = cli(EDIT + ['--out', 'ed/clip.mp4'], cache, root)
    assert r.returncode == 0, r.stderr[-2000:]
    (root / 'orig').mkdir(); shutil.copy(data_path('sample.mp4'), root / 'orig' / 'clip.mp4')
    r = cli(['evaluate', '--original', 'orig', '--edited', 'ed', '--max-frames', '4', '--cache-dir', cache / 'embeddings',
             '--out', 'report', '--quiet'], cache, root)
    assert r.returncode == 0, r.stderr[-2000:]
    return root, cache


def _copy(edited, tmp_path):
    root, cache = edited
    shutil.copytree(cache, tmp_path / 'cache')
    return tmp_path / 'cache'


def _counts(out: str) -> dict:
    "kind → files, from the table `ipfacediff cache` prints."
    lines = out.splitlines()
    return {l.split()[0]: int(l.split()[1]) for l in lines[2:lines.index(next(l for l in lines if l.startswith('total'))) + 1]}


def test_lists_what_edit_and_evaluate_keep(edited, tmp_path):
    cache = _copy(edited, tmp_path)
    r = cli(['cache'], cache, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == f'cache folder {cache}'
    assert _counts(r.stdout) == {'inversion': 1, 'tracks': 1, 'embeddings': 2, 'warp': 2, 'images': 0, 'partial': 0, 'total': 6}
    # --cache-dir names another folder: the flat cache of `evaluate --cache-dir`
    r = cli(['cache', '--cache-dir', cache / 'embeddings'], tmp_path / 'nowhere', tmp_path)
    assert _counts(r.stdout) == {'inversion': 0, 'tracks': 0, 'embeddings': 2, 'warp': 2, 'images': 0, 'partial': 0, 'total': 4}


def test_clearing_the_inversion_makes_the_next_edit_invert_again(edited, tmp_path):
    cache = _copy(edited, tmp_path)
    r = cli(['cache', '--clear', '--kind', 'inversion'], cache, tmp_path)
    assert r.returncode == 0 and r.stdout.startswith('removed 1 file(s)'), r.stdout + r.stderr
    r = cli(EDIT + ['--out', 'again.mp4', '--prompt', 'make her older'], cache, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'face track: reused from the cache' in r.stdout and 'inversion: reused' not in r.stdout, r.stdout
    assert sorted(f.kind for f in scan_cache(cache)) == ['embeddings', 'embeddings', 'inversion', 'tracks', 'warp', 'warp']


def test_older_than_counts_from_the_last_read(edited, tmp_path):
    "Files written long ago but read today are kept; the ones nobody read are removed."
    cache = _copy(edited, tmp_path)
    old = time.time() - 60 * 86400
    for f in scan_cache(cache): os.utime(f.path, (old, old))
    r = cli(EDIT + ['--out', 'again.mp4'], cache, tmp_path)             # reads the track and the inversion
    assert 'inversion: reused from the cache' in r.stdout, r.stdout + r.stderr[-2000:]
    r = cli(['cache', '--clear', '--older-than', '30', '--dry-run'], cache, tmp_path)
    assert r.returncode == 0 and 'would remove 4 file(s)' in r.stdout, r.stdout
    assert len(scan_cache(cache)) == 6                                  # a dry run removes nothing
    r = cli(['cache', '--clear', '--older-than', '30'], cache, tmp_path)
    assert r.returncode == 0 and r.stdout.startswith('removed 4 file(s)'), r.stdout
    assert sorted(f.kind for f in scan_cache(cache)) == ['inversion', 'tracks']


def test_max_size_removes_least_recently_used_first(edited, tmp_path):
    cache = _copy(edited, tmp_path)
    files = scan_cache(cache)
    for i, f in enumerate(sorted(files, key=lambda f: -f.size)):      # the largest is the oldest
        os.utime(f.path, (time.time() - (10 - i) * 86400,) * 2)
    biggest = max(files, key=lambda f: f.size)
    total = sum(f.size for f in files)
    r = cli(['cache', '--clear', '--max-size', str(total - 1)], cache, tmp_path)
    assert r.returncode == 0 and r.stdout.startswith('removed 1 file(s)'), r.stdout
    assert not biggest.path.exists() and len(scan_cache(cache)) == 5


def test_only_its_own_files_and_partials_older_than_an_hour(edited, tmp_path):
    cache = _copy(edited, tmp_path)
    key = scan_cache(cache)[0].path.stem[-32:]
    mine = cache / 'inversion' / 'notes.pt'; mine.write_text('a file of the user')
    outside = tmp_path / 'outside.npz'; outside.write_bytes(b'elsewhere')
    (cache / 'tracks' / ('f' * 32 + '.npz')).symlink_to(outside)          # a link under a cache name: not ours
    fresh = cache / 'inversion' / f'.{key}.abcd1234.pt'; fresh.write_bytes(b'a write going on')
    stale = cache / 'tracks' / f'.{key}.wxyz_987.npz'; stale.write_bytes(b'a write killed midway')
    os.utime(stale, (time.time() - 7200,) * 2)
    r = cli(['cache'], cache, tmp_path)
    assert _counts(r.stdout)['partial'] == 2 and _counts(r.stdout)['total'] == 8, r.stdout
    r = cli(['cache', '--clear'], cache, tmp_path)
    assert r.returncode == 0 and r.stdout.startswith('removed 7 file(s)'), r.stdout
    assert mine.exists() and outside.exists() and fresh.exists() and not stale.exists()
    assert [f.path for f in scan_cache(cache)] == [fresh]


@pytest.mark.parametrize('args, msg', [
    (['--older-than', '30'], '--older-than chooses what --clear removes: add --clear (or --dry-run to list it first)'),
    (['--clear', '--kind', 'inversions'], "unknown cache kind 'inversions': use one or more of inversion, tracks, embeddings, warp, images, partial"),
    (['--clear', '--max-size', '20 gigs'], "--max-size '20 gigs' is not a size"),
    (['--clear', '--older-than', '-3'], '--older-than must be a number of days ≥ 0'),
    (['--clear', '--older-than', 'week'], "argument --older-than: invalid float value: 'week'"),
])
def test_bad_input_exit_2_nothing_removed(edited, tmp_path, args, msg):
    cache = _copy(edited, tmp_path)
    r = cli(['cache', *args], cache, tmp_path)
    assert r.returncode == 2 and msg in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and len(scan_cache(cache)) == 6


def test_missing_or_file_cache_folder(tmp_path):
    r = cli(['cache'], tmp_path / 'never', tmp_path)
    assert r.returncode == 0 and 'does not exist yet: nothing is cached' in r.stdout and not (tmp_path / 'never').exists()
    r = cli(['cache', '--clear'], tmp_path / 'never', tmp_path)
    assert r.returncode == 0 and r.stdout.startswith('removed 0 file(s)') and not (tmp_path / 'never').exists()
    (tmp_path / 'f').write_text('x')
    r = cli(['cache'], tmp_path / 'f', tmp_path)
    assert r.returncode == 2 and 'the cache folder' in r.stderr and 'is a file' in r.stderr


def test_a_killed_photo_download_is_cleaned_up_by_the_next(tmp_path, monkeypatch):
    "`fetch_face_recognition_images` downloads into a temporary folder beside the photos: one left by a kill goes at the next download."
    import subprocess as sp
    from ipfacediff import embedders as E
    from ipfacediff.utils import UserError
    d = tmp_path / 'face_recognition_images'
    stale, fresh = d / 'tmpk1ll3d_0', d / 'tmpn0wn0w_1'
    for f in (stale, fresh): f.mkdir(parents=True); (f / 'face_recognition-1.3.0.tar.gz').write_bytes(b'part')
    os.utime(stale, (time.time() - 7200,) * 2)
    monkeypatch.setattr(E.subprocess, 'run', lambda *a, **k: sp.CompletedProcess(a, 1, '', 'ERROR: no network here'))
    with pytest.raises(UserError, match='no network here'): E.fetch_face_recognition_images(tmp_path)
    assert not stale.exists() and fresh.exists()               # another download may be filling that one now
    assert sorted(p.name for p in d.iterdir()) == [fresh.name]  # and the failed one left nothing
