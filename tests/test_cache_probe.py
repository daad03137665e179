"Probing `ipfacediff cache` (ipfacediff/cache.py): bugs found in 9bd325c (each says so) and guards for behaviour worth keeping."
import contextlib, io, os, re, time, uuid
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from ipfacediff import cache as C
from ipfacediff.cache import CacheFile, scan_cache, select_for_removal, parse_size, format_size, clear_cache
from ipfacediff.cli import main
from ipfacediff.utils import UserError, atomic_output, default_cache_dir

KEY = '0123456789abcdef' * 2


def cli(*args, env=None, cwd=None):
    "`ipfacediff cache ARGS` in this process: (exit code, stdout, stderr)."
    o, e = io.StringIO(), io.StringIO()
    old = os.getcwd()
    try:
        if cwd is not None: os.chdir(cwd)
        with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e), mock.patch.dict(os.environ, env or {}):
            rc = main(['cache', *map(str, args)])
    finally: os.chdir(old)
    return rc, o.getvalue(), e.getvalue()


def put(p: Path, n: int = 10, age_days: float = 0) -> Path:
    "A file at `p` of about `n` bytes: under a cache file's name, what the package writes there (the scan reads contents); else bytes."
    p.parent.mkdir(parents=True, exist_ok=True)
    k = max(n // 8, 1)
    if not re.fullmatch(r'(?:warp-)?[0-9a-f]{32}\.(?:npz|pt)', p.name): p.write_bytes(b'x' * n)
    elif p.suffix == '.pt': torch.save({1: torch.zeros(k, dtype=torch.float64)}, p)
    elif p.name.startswith('warp-'): np.savez(p, errors=np.zeros(k))
    elif p.parent.name == 'tracks': np.savez(p, pad=np.zeros(k), **{f: np.zeros(1) for f in C._TRACK_FIELDS})
    else: np.savez(p, frames=np.zeros(k), detected=np.zeros(1, bool), boxes=np.zeros((1, 4)))
    if age_days: t = time.time() - age_days * 86400; os.utime(p, (t, t))
    return p


# ---------------------------------------------------------------------------------------------------- bugs

def test_older_than_with_max_size_is_not_quadratic():
    """Failed before its fix (9bd325c). `select_for_removal` with --older-than AND --max-size tests `f not in out` (a list, dataclass
    __eq__ on Paths) for every file, twice: O(n²). 2000 files 1.2 s, 5000 8.4 s, 10000 38 s (an evaluate cache of a
    5000-video gallery under two recognizers). Fix: keep `out` as a set of ids/paths (`chosen = {id(f) for f in out}`)."""
    now, n = time.time(), 1500
    files = [CacheFile(Path(f'/c/embeddings/{i:032x}.npz'), 'embeddings', 1000, now - 86400 * (i % 60)) for i in range(n)]
    calls = [0]
    real_eq = CacheFile.__eq__
    def counting_eq(a, b):
        calls[0] += 1
        if calls[0] > 20 * n: raise AssertionError(f'more than {20 * n} CacheFile comparisons for {n} files: quadratic')
        return real_eq(a, b)
    with mock.patch.object(CacheFile, '__eq__', counting_eq):
        out = select_for_removal(files, older_than=30, max_size=1000 * n // 4, now=now)
    assert len(out) == n - n // 4


def test_clear_leaves_a_users_files_named_like_keys(tmp_path):
    """Failed before its fix (9bd325c). The notebook promises that a --cache-dir pointed at a folder holding other files too leaves
    those alone, but only names are checked: `uuid.uuid4().hex` is 32 lowercase hex digits, so a user's
    `<uuid>.npz` in the folder given to `evaluate --cache-dir` (flat layout) or a user's own `inversion/<uuid>.pt`
    are removed by `ipfacediff cache --cache-dir D --clear`. Fix: check the content cheaply (npz member names
    {frames, detected, boxes, no_face} / {errors} / FaceTrack fields, via zipfile's namelist; the .pt a dict of
    int → Tensor), or mark cache folders with a CACHEDIR.TAG written by `usable_cache_dir` and refuse to clear
    a folder without one."""
    project = tmp_path / 'project'
    mine = project / f'{uuid.uuid4().hex}.npz'; project.mkdir()
    np.savez(mine, features=np.arange(5.0))                                  # the user's data, not an embedding
    inv = project / 'inversion' / f'{uuid.uuid4().hex}.pt'; inv.parent.mkdir()
    torch.save({'latents': torch.zeros(2)}, inv)                             # the user's own inversion experiment
    ours = put(project / f'warp-{KEY}.npz')                                  # (a real cache file beside them)
    rc, out, err = cli('--cache-dir', project, '--clear')
    assert mine.exists() and inv.exists(), 'a file of the user was removed'
    assert rc == 0 and out.startswith('removed 1 file(s)') and not ours.exists(), out + err


def test_cache_dir_pointed_at_the_tracks_folder_does_not_remove_tracks_as_embeddings(tmp_path):
    """Failed before its fix (9bd325c). The flat rule (KEY.npz in the folder itself = embeddings) classifies the face tracks as
    embeddings when --cache-dir names `CACHE/tracks` (as the tests do with `CACHE/embeddings`): the listing says
    'tracks 0, embeddings 1', `--kind tracks` removes nothing and `--kind embeddings` removes the track.
    (`--cache-dir CACHE/inversion` lists nothing at all.) Fix: check the npz's members (a track has FaceTrack's
    fields), or when the folder is named tracks/inversion/embeddings and its parent holds the cache, say to pass
    the parent."""
    track = put(tmp_path / 'cache' / 'tracks' / f'{KEY}.npz')
    rc, out, err = cli('--cache-dir', tmp_path / 'cache' / 'tracks', '--clear', '--kind', 'embeddings')
    assert track.exists(), 'a face track was removed as --kind embeddings'
    assert rc == 0 and out.startswith('removed 0 file(s)'), out + err
    rc, out, err = cli('--cache-dir', tmp_path / 'cache' / 'tracks', '--clear', '--kind', 'tracks')
    assert rc == 0 and out.startswith('removed 1 file(s)') and not track.exists(), out + err


def test_empty_cache_variable_is_not_the_current_folder(tmp_path):
    """Failed before its fix (9bd325c; rough edge, shared with `edit`). `IPFACEDIFF_CACHE=` (set but empty, common in Dockerfiles
    and CI env blocks) gives `Path('')` = '.', so `edit` writes inversion/ and tracks/ into the current folder and
    `ipfacediff cache --clear` removes key-named files there ('cache folder .'). Same for `--cache-dir ''`
    (`edit` treats it as unset: `a.cache_dir or default_cache_dir()`, but the pipeline then uses Path('')).
    Fix: in `default_cache_dir`, `os.environ.get('IPFACEDIFF_CACHE') or Path.home()/...`; refuse `--cache-dir ''`."""
    f = put(tmp_path / 'work' / f'{KEY}.npz')
    env = {'IPFACEDIFF_CACHE': '', 'HOME': str(tmp_path / 'home')}          # after a fix: never the real ~/.cache
    with mock.patch.dict(os.environ, env):
        assert default_cache_dir() != Path('')
    rc, out, err = cli('--clear', env=env, cwd=tmp_path / 'work')
    assert rc == 0 and out.startswith('removed 0 file(s)') and f.exists(), out + err
    rc, out, err = cli('--clear', '--cache-dir', '', cwd=tmp_path / 'work')
    assert rc == 2 and '--cache-dir is empty' in err and f.exists(), err


def test_a_file_reached_twice_through_a_linked_folder_is_counted_once(tmp_path):
    """Failed before its fix (9bd325c; rough edge). Linked sub-folders are followed, so `embeddings -> .` (or `embeddings` and the
    folder itself both linking to one place) lists each embedding twice: the table and the dry run say 2 files,
    20 B; --clear then says 'removed 1'. Fix: skip a file whose (st_dev, st_ino) was already seen."""
    put(tmp_path / f'{KEY}.npz')
    (tmp_path / 'embeddings').symlink_to('.')
    assert len(scan_cache(tmp_path)) == 1


# ---------------------------------------------------------------------------------------------------- guards

def test_only_exact_names_in_their_places(tmp_path):
    "Upper-case hex, folders named like keys, links under key names, keys in the wrong folder: none are ours."
    put(tmp_path / 'embeddings' / f'{KEY.upper()}.npz')
    (tmp_path / 'inversion' / f'{KEY}.pt').mkdir(parents=True)              # a folder named like a cache file
    put(tmp_path / 'elsewhere.npz'); (tmp_path / 'embeddings' / f'{"e" * 32}.npz').symlink_to(tmp_path / 'elsewhere.npz')
    (tmp_path / 'tracks').mkdir(parents=True, exist_ok=True); (tmp_path / 'inversion').mkdir(parents=True, exist_ok=True)
    (tmp_path / 'tracks' / f'{KEY}.pt').write_bytes(b'not a torch file')      # a cache's name, other contents
    np.savez(tmp_path / 'inversion' / f'{KEY}.npz', features=np.zeros(3))  # an .npz of none of our kinds
    put(tmp_path / 'other' / f'{KEY}.npz')                                  # a folder the package does not write
    put(tmp_path / f'{KEY[:-1]}.npz'); put(tmp_path / f'{KEY}0.npz')        # 31 and 33 digits
    put(tmp_path / f'.{KEY}.abc.npz.partial')                               # not a name mkstemp gives our caches
    assert scan_cache(tmp_path) == []
    rc, out, err = cli('--cache-dir', tmp_path, '--clear')
    assert rc == 0 and out.startswith('removed 0 file(s)')
    assert (tmp_path / 'inversion' / f'{KEY}.pt').is_dir() and (tmp_path / 'elsewhere.npz').exists()


def test_the_names_the_package_writes_are_found(tmp_path):
    "A warp-error file written by `media_warp_error`, and `atomic_output`'s temporary (a killed write) under every cache name."
    from ipfacediff.metrics import media_warp_error
    frames = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    media_warp_error('clip.mp4', frames, cache_dir=tmp_path / 'embeddings', digest='d' * 64)
    assert [f.kind for f in scan_cache(tmp_path)] == ['warp']
    for sub, name in (('inversion', f'{KEY}.pt'), ('tracks', f'{KEY}.npz'), ('', f'{KEY}.npz'), ('', f'warp-{KEY}.npz'),
                      ('embeddings', f'{KEY}.npz'), ('embeddings', f'warp-{KEY}.npz')):
        (tmp_path / sub).mkdir(exist_ok=True)
        with atomic_output(tmp_path / sub / name, overwrite=True) as tmp:
            tmp.write_bytes(b'half')
            found = {f.path: f.kind for f in scan_cache(tmp_path)}
            assert found.get(tmp) == 'partial', (tmp, found)
            # a partial younger than an hour is never removed, whatever the options
            assert tmp not in [f.path for f in clear_cache(tmp_path, 'partial', older_than=0, max_size=0, dry_run=True)]


def test_partial_only_when_over_an_hour_old_even_with_older_than_zero(tmp_path):
    fresh = put(tmp_path / 'tracks' / f'.{KEY}.abcd_123.npz', age_days=0.5 / 24)
    stale = put(tmp_path / 'tracks' / f'.{KEY}.wxyz9876.npz', age_days=2 / 24)
    track = put(tmp_path / 'tracks' / f'{KEY}.npz', age_days=30)
    rc, out, err = cli('--cache-dir', tmp_path, '--clear', '--kind', 'partial', '--older-than', '0')
    assert rc == 0 and out.startswith('removed 1 file(s), 10 B; 2 left'), out + err
    assert fresh.exists() and not stale.exists() and track.exists()


def test_dry_run_alone_lists_and_removes_nothing(tmp_path):
    a = put(tmp_path / 'inversion' / f'{KEY}.pt', 300, age_days=40)
    b = put(tmp_path / 'embeddings' / f'{"b" * 32}.npz', 100, age_days=1)
    rc, out, err = cli('--cache-dir', tmp_path, '--dry-run', '--older-than', '30')
    assert rc == 0 and a.exists() and b.exists()
    assert out.splitlines()[-1] == f'would remove 1 file(s), {format_size(a.stat().st_size)}; 1 would be left, {format_size(b.stat().st_size)}'
    assert str(a) in out and str(b) not in out


def test_max_size_zero_removes_everything_but_fresh_partials(tmp_path):
    a = put(tmp_path / f'{KEY}.npz', age_days=3); b = put(tmp_path / 'tracks' / f'{KEY}.npz', age_days=2)
    fresh = put(tmp_path / f'.{KEY}.abcdefgh.npz')
    n = a.stat().st_size + b.stat().st_size
    rc, out, err = cli('--cache-dir', tmp_path, '--clear', '--max-size', '0')
    assert rc == 0 and out.startswith(f'removed 2 file(s), {format_size(n)}; 1 left'), out
    assert [f.path for f in scan_cache(tmp_path)] == [fresh]


@pytest.mark.parametrize('text, n', [('0', 0), ('4096', 4096), ('20G', 20 << 30), ('1.5GiB', 3 << 29), ('500mb', 500 << 20),
                                     (' 3 K ', 3072), ('.5M', 1 << 19), ('2T', 2 << 40)])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize('text', ['1e3', 'inf', 'nan', '-1', '20 gigs', '', 'G', '1P'])
def test_parse_size_refuses(text):
    with pytest.raises(UserError, match='is not a size'): parse_size(text)


def test_format_size():
    assert [format_size(n) for n in (0, 1023, 1024, 3 << 29, 1 << 40, 5 << 50)] == \
           ['0 B', '1023 B', '1.0 KiB', '1.5 GiB', '1.0 TiB', '5120.0 TiB']


@pytest.mark.parametrize('args, msg', [
    (['--clear', '--older-than', 'nan'], '--older-than must be a number of days ≥ 0, got nan'),
    (['--clear', '--kind', ','], "unknown cache kind ''"),
    (['--dry-run', '--max-size', '1e3'], "--max-size '1e3' is not a size"),
    (['--max-size', '1G'], '--max-size chooses what --clear removes'),
])
def test_bad_input_one_line_exit_2_nothing_removed(tmp_path, args, msg):
    f = put(tmp_path / 'tracks' / f'{KEY}.npz', age_days=100)
    rc, out, err = cli('--cache-dir', tmp_path, *args)
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1 and out == '' and f.exists(), err


def test_older_than_inf_removes_nothing(tmp_path):
    f = put(tmp_path / 'tracks' / f'{KEY}.npz', age_days=10000)
    rc, out, err = cli('--cache-dir', tmp_path, '--clear', '--older-than', 'inf')
    assert rc == 0 and out.startswith('removed 0 file(s)') and f.exists()


def test_table(tmp_path):
    put(tmp_path / 'inversion' / f'{KEY}.pt', 3 << 19, age_days=0)
    put(tmp_path / 'tracks' / f'{KEY}.npz', 100)
    os.utime(tmp_path / 'inversion' / f'{KEY}.pt', (0, 86400 * 10))        # 1970-01-10 or -11, by time zone
    rc, out, err = cli('--cache-dir', tmp_path)
    lines = out.splitlines()
    assert rc == 0 and lines[0] == f'cache folder {tmp_path}' and lines[1].split() == ['kind', 'files', 'size', 'last', 'used', '(oldest', '…', 'newest)']
    assert lines[2].split()[:4] == ['inversion', '1', '1.5', 'MiB'] and '1970-01-1' in lines[2]
    assert lines[7].split() == ['partial', '0', '—'] and lines[8].split() == ['total', '2', '1.5', 'MiB']
    assert len({re.match(r'\S+\s+\S+', l).end() for l in lines[1:9]}) == 1   # the files column is right-aligned
    assert format_size(3 << 39) == '1.5 TiB'


def test_a_file_removed_by_another_run_meanwhile_is_skipped(tmp_path):
    a = put(tmp_path / 'tracks' / f'{KEY}.npz'); b = put(tmp_path / 'tracks' / f'{"b" * 32}.npz')
    files = scan_cache(tmp_path)
    a.unlink()                                                               # another `cache --clear`
    with mock.patch.object(C, 'scan_cache', lambda d=None: files):
        gone = clear_cache(tmp_path)
    assert [f.path for f in gone] == [b] and not b.exists()


def test_unreadable_folder_or_unremovable_file_is_one_line_without_traceback(tmp_path):
    "(Tests run as root: permissions are mocked.) Exit 1 for an unreadable folder; a file that cannot be removed names it."
    for k in 'abc': put(tmp_path / 'tracks' / f'{k * 32}.npz', age_days=ord(k) - 90)
    real_iterdir, real_unlink = Path.iterdir, Path.unlink
    def iterdir(self):
        if self.name == 'tracks': raise PermissionError(13, 'Permission denied', str(self))
        return real_iterdir(self)
    with mock.patch.object(Path, 'iterdir', iterdir): rc, out, err = cli('--cache-dir', tmp_path)
    assert rc == 0 and err == f'ipfacediff: warning: cannot read the cache folder {tmp_path / "tracks"} (Permission denied): its files are left out\n', err
    assert out.splitlines()[3].split()[:2] == ['tracks', '0']               # the others are listed
    def unlink(self, *a, **k):
        if self.name.startswith('b'): raise PermissionError(13, 'Permission denied', str(self))
        return real_unlink(self, *a, **k)
    with mock.patch.object(Path, 'unlink', unlink): rc, out, err = cli('--cache-dir', tmp_path, '--clear')
    assert rc == 1 and len(err.strip().splitlines()) == 1 and 'Traceback' not in err    # the system refused: 1, not 2
    b = tmp_path / 'tracks' / ('b' * 32 + '.npz')
    assert err == f'ipfacediff: error: could not remove 1 cache file(s) (Permission denied; 2 removed): check the owner and permissions of the first, or remove it by hand: {b}\n', err
    assert [f.path for f in scan_cache(tmp_path)] == [b]                    # the others were removed all the same


def test_a_linked_cache_folder_is_followed_and_a_dangling_one_is_empty(tmp_path):
    real = tmp_path / 'real'; put(real / 'tracks' / f'{KEY}.npz')
    (tmp_path / 'link').symlink_to(real)
    assert [f.kind for f in scan_cache(tmp_path / 'link')] == ['tracks']
    (tmp_path / 'dangling').symlink_to(tmp_path / 'nowhere')
    rc, out, err = cli('--cache-dir', tmp_path / 'dangling', '--clear')
    assert rc == 0 and out.startswith('removed 0 file(s)')
