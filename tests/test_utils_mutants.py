"""Invariants of `ipfacediff.utils` that no other test pinned down (mutation review of the shared helpers: each test
fails on at least one code change that the notebook's checks and the rest of tests/ let through). What they pin:
`atomic_output` publishes the very file it handed out by one rename (never a copy a reader could catch half-written);
outputs take the user's umask whatever it is, and the process umask is left as it was; Ctrl-C / SIGTERM (a
`KeyboardInterrupt`, which the CLI raises for SIGTERM) inside `atomic_output` / `atomic_dir` leaves no temporary and no
torn output; `file_size_limit` counts KiB of 1024 bytes; `writing` knows newer torch's failed-write message and
invents no errno; `save_figure` writes PNG when the path has no suffix; `read_settings` gives one cache key for one rate; `ordered_map`
reads at most `window` items ahead; `cpu_workers` counts the CPUs this process may use; `resolve_device` on a (mocked)
two-GPU machine; the generator of `seed_everything` is seeded like torch's own; `weights_fingerprint` sees shapes and
names; an installed package finds its own data, not a `data/` folder another distribution left in site-packages. CPU only, tiny, offline, tmp_path only, one core."""
import errno, json, os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from shared import one_line_error
from ipfacediff import utils as U
from ipfacediff.utils import (atomic_dir, atomic_output, cpu_workers, file_size_limit, ordered_map, read_settings, resolve_device,
                              save_figure, seed_everything, weights_fingerprint, writing)

torch.set_num_threads(1)


@pytest.fixture
def umask():
    "Set the process umask for a test; the caller's is put back afterwards."
    old = os.umask(0o022); os.umask(old)
    yield lambda m: os.umask(m)
    os.umask(old)


def _mode(p): return os.stat(p).st_mode & 0o777


# ================================================================ atomic outputs

def test_atomic_output_renames_the_file_it_handed_out_into_place(tmp_path):
    "The output is the very file written inside the block, moved by one rename (same inode): a copy would show readers a half-copied file."
    out = tmp_path / 'clip.mp4'
    with atomic_output(out) as tmp:
        tmp.write_bytes(b'x' * 4096); ino = os.stat(tmp).st_ino
        assert not out.exists()                                   # nothing at the target while the work runs
    assert os.stat(out).st_ino == ino and out.read_bytes() == b'x' * 4096
    assert sorted(p.name for p in tmp_path.iterdir()) == ['clip.mp4']


@pytest.mark.parametrize('mask,file_mode,dir_mode', [(0o027, 0o640, 0o750), (0o002, 0o664, 0o775)], ids=['umask027', 'umask002'])
def test_outputs_take_whatever_umask_the_user_has(tmp_path, umask, mask, file_mode, dir_mode):
    "A file output is 0666 & ~umask and a folder output 0777 & ~umask for any umask (not a fixed 0644 / 0755)."
    umask(mask)
    with atomic_output(tmp_path / 'a.txt') as tmp: tmp.write_text('a')
    with atomic_dir(tmp_path / 'rep') as tmp: (tmp / 'b.txt').write_text('b')
    assert _mode(tmp_path / 'a.txt') == file_mode and _mode(tmp_path / 'rep') == dir_mode


def test_atomic_output_leaves_the_process_umask_as_it_was(tmp_path, umask):
    "Reading the umask must not change it: after an output, files the program makes otherwise keep the user's mode."
    umask(0o027)
    with atomic_output(tmp_path / 'a.txt') as tmp: tmp.write_text('a')
    with atomic_dir(tmp_path / 'rep') as tmp: pass
    assert os.umask(0o027) == 0o027
    (tmp_path / 'later.txt').write_text('x')
    assert _mode(tmp_path / 'later.txt') == 0o640


def test_interrupt_inside_atomic_output_leaves_nothing(tmp_path):
    "Ctrl-C (or SIGTERM, which the CLI raises as a KeyboardInterrupt) half-way: no output, no temporary file left, the interrupt goes on."
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(tmp_path / 'clip.mp4') as tmp:
            tmp.write_bytes(b'half'); raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_interrupt_inside_atomic_dir_keeps_the_old_folder_and_no_partial(tmp_path):
    "Interrupted while rebuilding an --overwrite'd folder: the old folder stays whole, no temporary folder is left beside it."
    out = tmp_path / 'report'; out.mkdir(); (out / 'old.txt').write_text('old')
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / 'new.txt').write_text('new'); raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ['report'] and [p.name for p in out.iterdir()] == ['old.txt']


# ================================================================ full disk, figures, cache keys

def test_file_size_limit_counts_kib_of_1024_bytes(tmp_path):
    "file_size_limit(1): a 1024-byte file fits; a longer write stops at exactly 1024 bytes with EFBIG."
    with file_size_limit(1):
        (tmp_path / 'fits.bin').write_bytes(b'a' * 1024)
        with pytest.raises(OSError) as e: (tmp_path / 'big.bin').write_bytes(b'b' * 3000)
    assert e.value.errno == errno.EFBIG
    assert os.path.getsize(tmp_path / 'fits.bin') == 1024 and os.path.getsize(tmp_path / 'big.bin') == 1024


def test_torch_saves_failed_write_without_the_enforce_prefix_is_an_oserror():
    """Newer torch reports a full disk as `PytorchStreamWriter failed writing file …` with no `inline_container` prefix: still
    an OSError naming the user's file. torch does not say which system error it was, so none is invented (EIO, not ENOSPC:
    a size limit or a quota fails the same way)."""
    with pytest.raises(OSError) as e, writing('weights.pt'):
        raise RuntimeError('PytorchStreamWriter failed writing file data/0: file write failed')
    assert type(e.value) is OSError and e.value.filename == 'weights.pt'
    assert e.value.errno == errno.EIO and 'incomplete write' in e.value.strerror


def test_save_figure_without_a_suffix_writes_png(tmp_path):
    "A figure path with no suffix gets PNG bytes (the documented default), not another format."
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(1, 1))
    try: assert save_figure(fig, tmp_path / 'plot', dpi=20).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    finally: plt.close(fig)


def test_read_settings_is_one_cache_key_for_one_rate():
    "10, 10.0, np.float32(10) and np.int64(10) fps are one key once serialised; NumPy frame counts become plain ints."
    keys = {json.dumps(read_settings(f, n), sort_keys=True) for f in (10, 10.0, np.float32(10), np.int64(10)) for n in (5, np.int64(5))}
    assert keys == {'{"fps": 10.0, "max_frames": 5}'}
    s = read_settings(np.float32(12.5), np.int64(3))
    assert type(s['fps']) is float and type(s['max_frames']) is int


# ================================================================ CPUs, devices, seeds

@pytest.mark.parametrize('window', [1, 3])
def test_ordered_map_reads_at_most_window_items_ahead(window):
    "When a result is handed out, at most `window` items have been read and not yet handed out (that one included)."
    from concurrent.futures import ThreadPoolExecutor
    read, got = [], []
    def items():
        for i in range(20): read.append(i); yield i
    with ThreadPoolExecutor(2) as ex:
        for r in ordered_map(ex, lambda x: x * x, items(), window):
            assert len(read) - len(got) <= window, (len(read), len(got))
            got.append(r)
    assert got == [i * i for i in range(20)]


@pytest.mark.skipif(not hasattr(os, 'sched_getaffinity'), reason='needs sched_getaffinity (Linux)')
def test_cpu_workers_counts_the_cpus_this_process_may_use(monkeypatch):
    "Under taskset / a container's CPU set the default is the CPUs the process may run on, not the machine's count."
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 5})
    monkeypatch.setattr(os, 'cpu_count', lambda: 64)
    assert cpu_workers() == 2 and cpu_workers(3) == 3


@pytest.fixture
def fake_cuda(monkeypatch):
    "A machine with two CUDA GPUs as torch reports it (no GPU needed); the devices made current are recorded."
    made = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(torch.cuda, 'set_device', lambda d: made.append(torch.device(d)))
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    return made


def test_auto_device_is_cuda_where_there_is_one(fake_cuda):
    assert resolve_device('auto') == torch.device('cuda') and resolve_device(None) == torch.device('cuda')


def test_a_gpu_index_past_the_last_is_refused(fake_cuda):
    "With 2 GPUs, cuda:0 and cuda:1 exist and cuda:2 is a one-line UserError naming what there is."
    assert resolve_device('cuda:1') == torch.device('cuda:1')
    one_line_error(lambda: resolve_device('cuda:2'), 'cuda:2 does not exist', '2 CUDA GPU(s)')


def test_cuda_n_becomes_the_current_gpu_in_one_process_only(fake_cuda, monkeypatch):
    "One process: cuda:1 is made current (timers and memory statistics use it); under a launcher (WORLD_SIZE=2) it is left alone."
    resolve_device('cuda:1')
    assert fake_cuda == [torch.device('cuda:1')]
    monkeypatch.setenv('WORLD_SIZE', '2')
    resolve_device('cuda:0')
    assert fake_cuda == [torch.device('cuda:1')]


def test_seed_everythings_generator_is_seeded_like_torch():
    "The returned generator is 'seeded the same way': it draws what torch's global RNG draws right after seed_everything(s)."
    with torch.random.fork_rng():
        st = (U.random.getstate(), np.random.get_state())
        try:
            g = seed_everything(11)
            mine, glob = torch.rand(5, generator=g), torch.rand(5)
        finally: U.random.setstate(st[0]); np.random.set_state(st[1])
    assert torch.equal(mine, glob) and torch.equal(mine, torch.rand(5, generator=torch.Generator().manual_seed(11)))


# ================================================================ fingerprints

def test_weights_fingerprint_sees_the_shape():
    "The same bytes under the same name in another shape (a 3×2 vs 2×3 layer) are other weights: the cache key differs."
    a, b = torch.nn.Linear(2, 3, bias=False), torch.nn.Linear(3, 2, bias=False)
    for m in (a, b): torch.nn.init.zeros_(m.weight)
    assert weights_fingerprint(a) != weights_fingerprint(b)


def test_weights_fingerprint_sees_the_names():
    "The same tensor stored under another name is another model (e.g. a bias where a scale was): the cache key differs."
    a, b = torch.nn.Module(), torch.nn.Module()
    a.register_buffer('scale', torch.ones(3)); b.register_buffer('shift', torch.ones(3))
    assert weights_fingerprint(a) != weights_fingerprint(b)


# ================================================================ shipped data

def test_an_installed_package_uses_its_own_data_not_site_packages_data(tmp_path, monkeypatch):
    "Installed, `ipfacediff/data` holds the assets; a stray `site-packages/data` (another distribution's) must not shadow it."
    site = tmp_path / 'site-packages'
    (site / 'ipfacediff' / 'data' / 'tokenizer').mkdir(parents=True); (site / 'ipfacediff' / '__init__.py').write_text('')
    (site / 'data').mkdir()                                              # someone else's
    monkeypatch.setattr(U.importlib.util, 'find_spec', lambda name: SimpleNamespace(origin=str(site / 'ipfacediff' / '__init__.py')))
    assert U.data_dir() == (site / 'ipfacediff' / 'data').resolve()
    assert U.data_path('tokenizer') == (site / 'ipfacediff' / 'data' / 'tokenizer').resolve()
