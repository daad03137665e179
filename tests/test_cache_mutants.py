"""Invariants of `ipfacediff.cache` (`ipfacediff cache`) that no other test pinned down (mutation review of cache.py: each test
fails on at least one code change that the notebook's checks and the rest of tests/ let through). What they pin: only files
`ipfacediff` wrote are listed or removed, judged by name, place and content (a user's photo in the photo folder, a user's
`KEY.backup.npz`, an npz with `frames` alone, a .pt dict with one tensor among other things, an empty dict, a linked file, a
folder under a cache name: none are ours); a .pt is checked without unpickling it (no code of the file runs); `--kind` takes
'a, b'; a negative max size is refused; a fresh partial still counts towards `--max-size`; an error names the first file that
could not be removed; the table gives the oldest then the newest day (one day once), in local time, a total that includes the
partials, and the hint to remove only when there is something to remove. Tiny files in tmp_path, CPU, offline, one core."""
import contextlib, io, os, time
from pathlib import Path
from unittest import mock

os.environ.setdefault('HF_HUB_OFFLINE', '1')
import numpy as np
import pytest
import torch

from ipfacediff import cache as C
from ipfacediff.cache import CacheFile, cache_table, clear_cache, scan_cache, select_for_removal
from ipfacediff.cli import main
from ipfacediff.utils import UserError

torch.set_num_threads(1)
KEY = '0123456789abcdef' * 2
DAY = 86400


@pytest.fixture(autouse=True)
def _no_real_cache(tmp_path, monkeypatch):
    "Whatever a test forgets to pass, the default cache folder is under tmp_path, never the user's."
    monkeypatch.setenv('IPFACEDIFF_CACHE', str(tmp_path / 'default-cache'))
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))


def cli(*args):
    "`ipfacediff cache ARGS` in this process: (exit code, stdout, stderr)."
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e): rc = main(['cache', *map(str, args)])
    return rc, o.getvalue(), e.getvalue()


def aged(p: Path, days: float) -> Path:
    t = time.time() - days * DAY; os.utime(p, (t, t), follow_symlinks=False); return p


def embeddings(p: Path, days: float = 10) -> Path:
    "An embeddings file as `evaluate --cache-dir` writes it (its members)."
    p.parent.mkdir(parents=True, exist_ok=True)
    np.savez(p, frames=np.zeros((2, 4)), detected=np.ones(2, bool), boxes=np.zeros((2, 4)))
    return aged(p, days)


# ---------------------------------------------------------------------------------------------------- what is ours

def test_a_users_photo_in_the_photo_folder_is_not_ours(tmp_path):
    "The photo folder holds the four photos the package downloads; another .jpg there is the user's: not listed, not removed."
    folder = tmp_path / 'face_recognition_images'; folder.mkdir()
    ours = folder / 'biden.jpg'; ours.write_bytes(b'jpeg'); aged(ours, 5)
    mine = folder / 'holiday.jpg'; mine.write_bytes(b'jpeg'); aged(mine, 5)
    assert [(f.path, f.kind) for f in scan_cache(tmp_path)] == [(ours, 'images')]
    rc, out, err = cli('--cache-dir', tmp_path, '--clear')
    assert rc == 0 and mine.exists() and not ours.exists(), out + err


def test_a_key_named_file_without_the_leading_dot_is_not_a_partial(tmp_path):
    "A partial is `atomic_output`'s hidden temporary `.KEY.xxxx.npz`; the user's `KEY.backup.npz` beside the tracks is left alone."
    (tmp_path / 'tracks').mkdir()
    mine = tmp_path / 'tracks' / f'{KEY}.backup.npz'; mine.write_bytes(b'my copy'); aged(mine, 30)
    killed = tmp_path / 'tracks' / f'.{KEY}.ab12_x9z.npz'; killed.write_bytes(b'cut'); aged(killed, 1)
    assert [(f.path, f.kind) for f in scan_cache(tmp_path)] == [(killed, 'partial')]
    rc, out, err = cli('--cache-dir', tmp_path, '--clear')
    assert rc == 0 and out.startswith('removed 1 file(s)') and mine.exists() and not killed.exists(), out + err


def test_an_npz_is_embeddings_only_with_frames_detected_and_boxes(tmp_path):
    "A user's npz under a key name that holds `frames` (a common name) but not the rest of an embeddings file is not ours."
    mine = tmp_path / f'{"a" * 32}.npz'; np.savez(mine, frames=np.zeros((3, 8)), labels=np.arange(3))
    ours = embeddings(tmp_path / f'{"b" * 32}.npz')
    assert [f.path for f in scan_cache(tmp_path)] == [ours]
    clear_cache(tmp_path)
    assert mine.exists() and not ours.exists()


@pytest.mark.parametrize('content', [{5: torch.zeros(2), 'note': 'mine'}, {5: torch.zeros(2), 6: [1, 2]}, {}],
                         ids=['a_string_beside', 'a_list_beside', 'empty'])
def test_a_pt_is_an_inversion_only_when_every_item_is_step_to_tensor(tmp_path, content):
    "An inversion is {t: z_t} and nothing else; a user's dict with one tensor among other things, or an empty one, is not."
    (tmp_path / 'inversion').mkdir()
    mine = tmp_path / 'inversion' / f'{"c" * 32}.pt'; torch.save(content, mine)
    ours = tmp_path / 'inversion' / f'{KEY}.pt'; torch.save({981: torch.zeros(4, 2, 2), 1: torch.zeros(4, 2, 2)}, ours)
    assert [(f.path, f.kind) for f in scan_cache(tmp_path)] == [(ours, 'inversion')]
    clear_cache(tmp_path)
    assert mine.exists() and not ours.exists()


class _OpensAFile:
    "Pickled as a call of `open(path, 'w')`: loading it with pickle (not torch's weights-only loader) creates `path`."
    def __init__(self, path): self.path = str(path)
    def __reduce__(self): return (open, (self.path, 'w'))


def test_listing_never_runs_code_from_a_pt_file(tmp_path):
    "Scanning a folder (`ipfacediff cache` with no option) must not unpickle a user's .pt: the loader is weights-only."
    (tmp_path / 'inversion').mkdir()
    marker = tmp_path / 'code-ran'
    torch.save({1: _OpensAFile(marker)}, tmp_path / 'inversion' / f'{KEY}.pt')
    rc, out, err = cli('--cache-dir', tmp_path)
    assert not marker.exists(), 'listing the cache ran code from a .pt file'
    assert rc == 0 and out.splitlines()[-1].split()[:2] == ['total', '0'], out + err


def test_a_linked_file_under_a_cache_name_is_neither_listed_nor_removed(tmp_path):
    "A link to a real cache file elsewhere is someone else's: the link stays and its target's size is not counted."
    target = embeddings(tmp_path / 'elsewhere' / f'{"d" * 32}.npz')
    cache = tmp_path / 'cache'; cache.mkdir()
    link = cache / f'{KEY}.npz'; link.symlink_to(target)
    assert scan_cache(cache) == []
    rc, out, err = cli('--cache-dir', cache, '--clear')
    assert rc == 0 and out.startswith('removed 0 file(s)') and link.is_symlink() and target.exists(), out + err


def test_folders_named_like_a_partial_or_a_photo_are_skipped(tmp_path):
    "Names alone decide partials and photos; a folder under such a name is not a file of ours, and --clear does not trip on it."
    partial_dir = tmp_path / 'tracks' / f'.{KEY}.abcd1234.npz'; partial_dir.mkdir(parents=True); aged(partial_dir, 2)
    photo_dir = tmp_path / 'face_recognition_images' / 'obama.jpg'; photo_dir.mkdir(parents=True)
    assert scan_cache(tmp_path) == []
    rc, out, err = cli('--cache-dir', tmp_path, '--clear')
    assert rc == 0 and out.startswith('removed 0 file(s)') and partial_dir.is_dir() and photo_dir.is_dir(), out + err


# ---------------------------------------------------------------------------------------------------- what is removed

def _file(kind, size, days, now, name=None):
    return CacheFile(Path(f'/c/{name or kind}'), kind, size, now - days * DAY)


def test_kinds_may_have_spaces_after_the_commas():
    "`--kind 'inversion, warp'` is read as the two kinds, as `--kind inversion,warp` is."
    now = 1e9
    files = [_file('inversion', 10, 3, now), _file('tracks', 10, 2, now), _file('warp', 10, 1, now)]
    assert [f.kind for f in select_for_removal(files, 'inversion, warp', now=now)] == ['inversion', 'warp']
    assert [f.kind for f in select_for_removal(files, ' tracks ', now=now)] == ['tracks']


def test_a_negative_max_size_is_refused():
    "No set of files fits in fewer than 0 bytes: a negative bound is a mistake, not 'remove everything'."
    now = 1e9
    files = [_file('tracks', 10, 3, now)]
    with pytest.raises(UserError, match='--max-size must be ≥ 0'): select_for_removal(files, max_size=-1, now=now)


def test_a_fresh_partial_still_takes_its_space_under_max_size():
    "A partial younger than an hour is never removed, but it is on the disk: the others make room for it under --max-size."
    now = 1e9
    old = _file('tracks', 100, 3, now)
    fresh = CacheFile(Path(f'/c/.{KEY}.abcd1234.pt'), 'partial', 1000, now - 60)
    assert select_for_removal([old, fresh], max_size=1050, now=now) == [old]           # 1100 B on disk > 1050
    assert select_for_removal([old, fresh], max_size=1100, now=now) == []              # they fit already


def test_the_error_names_the_first_file_that_could_not_be_removed(tmp_path):
    "Of several files that cannot be removed, the message says 'check … the first' and names the least recently used one."
    for days, k in ((3, 'a'), (2, 'b'), (1, 'c')): embeddings(tmp_path / f'{k * 32}.npz', days)
    def unlink(self, *a, **k): raise PermissionError(13, 'Permission denied', str(self))
    with mock.patch.object(Path, 'unlink', unlink), pytest.raises(OSError) as e: clear_cache(tmp_path)
    assert e.value.filename == str(tmp_path / f'{"a" * 32}.npz') and 'could not remove 3 cache file(s)' in str(e.value)


# ---------------------------------------------------------------------------------------------------- the table

def _row(table: str, kind: str) -> str:
    return next(l for l in table.splitlines() if l.split()[0] == kind)


def test_table_gives_the_oldest_then_the_newest_day_and_one_day_once():
    now = time.mktime((2024, 3, 15, 12, 0, 0, 0, 0, -1))
    files = [_file('tracks', 10, 9, now, 't1'), _file('tracks', 10, 0, now, 't2'),
             _file('warp', 10, 0, now, 'w1'), _file('warp', 10, 0, now - 3600, 'w2')]
    table = cache_table(files)
    assert _row(table, 'tracks').endswith('2024-03-06 … 2024-03-15'), table
    assert _row(table, 'warp').endswith('  2024-03-15'), table                       # the one day, once
    assert '…' not in _row(table, 'warp'), table


def test_table_total_counts_the_partials_too():
    "The total is of every file listed: the partials take disk space as well."
    now = 1e9
    files = [_file('tracks', 1 << 20, 3, now), _file('partial', 1 << 20, 2, now)]
    assert _row(cache_table(files), 'total').split()[1:4] == ['2', '2.0', 'MiB']


@pytest.fixture
def utc_minus_12(monkeypatch):
    monkeypatch.setenv('TZ', 'TST+12')                                               # POSIX: 12 hours behind UTC
    time.tzset()
    yield
    monkeypatch.undo(); time.tzset()


def test_table_days_are_in_local_time(utc_minus_12):
    "Days are the user's (as `ls -l` gives them): 1970-01-11 06:00 UTC was still 1970-01-10 twelve hours west."
    t = 10 * DAY + 6 * 3600
    assert _row(cache_table([CacheFile(Path('/c/x'), 'tracks', 10, t)]), 'tracks').endswith('1970-01-10')


def test_the_hint_to_remove_is_given_only_when_there_is_something_to_remove(tmp_path):
    (tmp_path / 'cache').mkdir()
    rc, out, err = cli('--cache-dir', tmp_path / 'cache')
    assert rc == 0 and 'total' in out and '--clear' not in out, out + err
    embeddings(tmp_path / 'cache' / f'{KEY}.npz')
    rc, out, err = cli('--cache-dir', tmp_path / 'cache')
    assert rc == 0 and out.splitlines()[-1].startswith('remove with --clear'), out + err
