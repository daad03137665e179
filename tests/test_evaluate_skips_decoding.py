"`evaluate(cache_dir=...)` decodes a video only when something computed from its frames is missing from the cache."
import os, shutil
import numpy as np, pytest

os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
from ipfacediff import metrics as M
from ipfacediff.cli import main

from shared import evaluate_numbers


@pytest.fixture(scope='module')
def folders(clip_and_still): return clip_and_still[0]      # conftest: orig/clip.mp4, orig/still.png, ed/clip.mp4


def _run(root, out, cache, **kw):
    return M.evaluate(root / 'orig', root / 'ed', out, cache_dir=cache, progress=False, **kw)


def test_a_fully_cached_evaluation_decodes_nothing(folders, tmp_path, reads):
    r1 = _run(folders, tmp_path / 'r1', tmp_path / 'c')
    assert r1['decoding'] == {'decoded': 2, 'skipped': 0}
    assert sorted(reads) == ['clip.mp4', 'clip.mp4', 'still.png']             # the distractor: read by its embedding
    reads.clear()
    r2 = _run(folders, tmp_path / 'r2', tmp_path / 'c')
    assert r2['decoding'] == {'decoded': 0, 'skipped': 2} and reads == []
    assert r2['embeddings'] == {'computed': 0, 'cached': 3} and r2['warp_errors'] == {'computed': 0, 'cached': 2}
    assert evaluate_numbers(tmp_path / 'r2') == evaluate_numbers(tmp_path / 'r1')                # sizes, frame counts, rates: all as read
    # without a cache: the same report again, every video read
    M.evaluate(folders / 'orig', folders / 'ed', tmp_path / 'r0', progress=False)
    assert evaluate_numbers(tmp_path / 'r0') == evaluate_numbers(tmp_path / 'r1')


def test_a_missing_result_means_a_read(folders, tmp_path, reads):
    cache = tmp_path / 'c'
    _run(folders, tmp_path / 'r1', cache)
    assert _run(folders, tmp_path / 'r2', cache, flow='dis-fast')['decoding'] == {'decoded': 2, 'skipped': 0}   # no warp errors yet
    for f in cache.glob('[0-9a-f]*.npz'): f.unlink()                                 # the embeddings gone, the warp errors kept
    reads.clear()
    r = _run(folders, tmp_path / 'r3', cache)
    assert r['decoding'] == {'decoded': 2, 'skipped': 0} and r['warp_errors'] == {'computed': 0, 'cached': 2}
    assert sorted(reads) == ['clip.mp4', 'clip.mp4', 'still.png']
    assert evaluate_numbers(tmp_path / 'r3') == evaluate_numbers(tmp_path / 'r1')


def test_warp_files_without_the_info_gain_it(folders, tmp_path, reads):
    "A cache written before the info was kept: the next evaluation reads the videos and adds it; the one after reads none."
    cache = tmp_path / 'c'
    _run(folders, tmp_path / 'r1', cache)
    for f in cache.glob('warp-*.npz'):
        with np.load(f) as z: e = z['errors']
        np.savez(f, errors=e)
    r2 = _run(folders, tmp_path / 'r2', cache)
    assert r2['decoding'] == {'decoded': 2, 'skipped': 0} and r2['warp_errors'] == {'computed': 0, 'cached': 2}
    reads.clear()
    r3 = _run(folders, tmp_path / 'r3', cache)
    assert r3['decoding'] == {'decoded': 0, 'skipped': 2} and reads == []
    assert evaluate_numbers(tmp_path / 'r3') == evaluate_numbers(tmp_path / 'r1')


def test_the_clip_score_still_reads_the_frames(folders, tmp_path, reads, monkeypatch):
    "The CLIP direction needs the faces' pixels: with `clip`, every video is read even when the rest is cached."
    from ipfacediff.losses import tiny_clip
    cache = tmp_path / 'c'
    _run(folders, tmp_path / 'r1', cache)
    reads.clear()
    r = _run(folders, tmp_path / 'r2', cache, clip=tiny_clip(), prompt='a face with glasses', source_prompt='a face')
    assert r['decoding'] == {'decoded': 2, 'skipped': 0} and sorted(reads) == ['clip.mp4', 'clip.mp4']
    assert r['methods']['ed']['clip_direction'] is not None


def test_a_damaged_video_still_says_so(folders, tmp_path):
    "The warnings reading a video gave are kept with its info and shown again when it is not read."
    root = tmp_path / 'in'
    shutil.copytree(folders, root)
    p = root / 'ed' / 'clip.mp4'
    b, rng = bytearray(p.read_bytes()), np.random.default_rng(3)
    for pos in rng.integers(len(b) // 10, len(b) - 100, size=4):
        for j in range(25): b[pos + j] = rng.integers(0, 256)
    p.write_bytes(bytes(b))
    cache = tmp_path / 'c'
    with pytest.warns(UserWarning) as w1: r1 = M.evaluate(root / 'orig', root / 'ed', tmp_path / 'r1', cache_dir=cache, progress=False)
    damaged = [str(x.message) for x in w1 if 'is damaged' in str(x.message)]
    assert damaged, [str(x.message) for x in w1]   # seed 3 conceals with the pinned PyAV's FFmpeg (as in test_streaming_evaluate_inputs)
    with pytest.warns(UserWarning) as w2: r2 = M.evaluate(root / 'orig', root / 'ed', tmp_path / 'r2', cache_dir=cache, progress=False)
    assert r2['decoding'] == {'decoded': 0, 'skipped': 2}
    assert [str(x.message) for x in w2 if 'is damaged' in str(x.message)] == damaged    # the frame-rate check's (its first frame), the read's
    assert r2['methods'] == r1['methods']


def test_cli_says_what_was_not_decoded(folders, tmp_path, capsys):
    args = ['evaluate', '--original', str(folders / 'orig'), '--edited', str(folders / 'ed'), '--cache-dir', str(tmp_path / 'c'), '--quiet']
    assert main(args + ['--out', str(tmp_path / 'o1')]) == 0
    assert 'videos 0 not decoded (all cached), 2 decoded' in capsys.readouterr().out
    assert main(args + ['--out', str(tmp_path / 'o2')]) == 0
    assert 'warp errors 2 read, 0 computed; videos 2 not decoded (all cached), 0 decoded' in capsys.readouterr().out
