"""The warp-error cache (`media_warp_error`, `evaluate(cache_dir=...)`): tests from a mutation review.

Each test names the mutants of `ipfacediff/metrics.py` it kills. A cached result must be the number a fresh
computation gives, bit for bit, for every setting the frames or the flow depend on — and only those: equal
settings (fps 10 and 10.0) share one file, and a cache that is read back is counted as read."""
import json, os
from pathlib import Path
import cv2, numpy as np, pytest

os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
from ipfacediff import metrics as M, video as V
from ipfacediff.cli import main
from ipfacediff.video import write_video

from shared import orig_and_edit


@pytest.fixture(scope='module')
def clip(tmp_path_factory):
    "orig/clip.mp4 (10 frames at 10 fps, 160×90) and ed/clip.mp4, an edit of it; the frames of both."
    root = tmp_path_factory.mktemp('warpmut')
    orig_and_edit(root, 10, (160, 90))
    return root


def _mwe(path, cache, stats=None, frames='read', **kw):
    "`media_warp_error` of `path` with the frames `evaluate` would pass (read with the same fps, max_frames)."
    if isinstance(frames, str): frames = M.load_media(path, fps=kw.get('fps'), max_frames=kw.get('max_frames'))
    return M.media_warp_error(path, frames, cache_dir=cache, stats=stats, **kw)


def _fresh(path, flow='dis', occlusion_mask=False, fps=None, max_frames=None):
    "The uncached per-pair errors (`warp_error` on the frames read with these settings)."
    return M.warp_error(M.load_media(path, fps=fps, max_frames=max_frames), flow, occlusion_mask, return_per_frame=True)


def _same(got, want):
    "(mean, per-pair) equal bit for bit (NaN equal to NaN), per-pair float64 and 1-D."
    (e, p), (e0, p0) = got, want
    assert p.dtype == np.float64 and p.ndim == 1, (p.dtype, p.shape)
    assert p.tobytes() == np.asarray(p0, np.float64).tobytes()
    assert (e == e0) or (np.isnan(e) and np.isnan(e0)), (e, e0)
    assert type(e) is float


# --- the key: everything the numbers depend on, nothing else ----------------------------------------------------------

def test_fps_is_in_the_key_when_the_frame_count_is_the_same(clip, tmp_path):
    "fps 5 and fps 10 with max_frames 4 read 4 frames each, but other ones: the second may not reuse the first's errors."
    # kills: key_no_fps (the length check cannot catch it: both have 3 pairs)
    v, cache, st = clip / 'orig' / 'clip.mp4', tmp_path / 'c', M.EmbedStats()
    _same(_mwe(v, cache, st, fps=5, max_frames=4), _fresh(v, fps=5, max_frames=4))
    _same(_mwe(v, cache, st, fps=10, max_frames=4), _fresh(v, fps=10, max_frames=4))
    assert (st.computed, st.cached) == (2, 0)


def test_fps_int_and_float_share_one_file(clip, tmp_path, flows):
    "`--fps 10` (the CLI's float) and `fps=10` (the API's int) read the same frames: one cache file."
    # kills: key_fps_raw
    v, cache, st = clip / 'orig' / 'clip.mp4', tmp_path / 'c', M.EmbedStats()
    a = _mwe(v, cache, st, fps=10); n = len(flows)
    b = _mwe(v, cache, st, fps=10.0)
    c = _mwe(v, cache, st, fps=np.float64(10))
    assert (st.computed, st.cached) == (1, 2) and len(flows) == n
    _same(b, a); _same(c, a)
    assert len(list(cache.glob('warp-*.npz'))) == 1


def test_max_frames_is_in_the_key_no_thrashing(clip, tmp_path, flows):
    "max_frames 5, then all frames, then 5 again: the third is read (a key without max_frames would keep replacing one file)."
    # kills: key_no_max_frames, we_drops_max_frames (at evaluate's level: see test_evaluate_settings_reach_the_key)
    v, cache, st = clip / 'orig' / 'clip.mp4', tmp_path / 'c', M.EmbedStats()
    a = _mwe(v, cache, st, max_frames=5)
    b = _mwe(v, cache, st)
    _same(_mwe(v, cache, st, max_frames=5), a)
    assert (st.computed, st.cached) == (2, 1) and len(flows) == 4 + 9
    _same(a, _fresh(v, max_frames=5)); _same(b, _fresh(v))


def test_decoding_rules_are_in_the_key(clip, tmp_path, monkeypatch):
    "Other decoding rules (`video.DECODE_RULES` bumped) may give other pixels from the same bytes: computed again."
    # kills: key_no_decode
    v, cache, st = clip / 'orig' / 'clip.mp4', tmp_path / 'c', M.EmbedStats()
    _mwe(v, cache, st)
    monkeypatch.setattr(V, 'DECODE_RULES', V.DECODE_RULES + 1)
    _mwe(v, cache, st)
    assert (st.computed, st.cached) == (2, 0) and len(list(cache.glob('warp-*.npz'))) == 2
    _mwe(v, cache, st)
    assert (st.computed, st.cached) == (2, 1)


def test_flow_implementation_is_in_the_key(clip, tmp_path, monkeypatch):
    "Each method its own file, and another OpenCV is another file (DIS's numbers change between OpenCV releases)."
    # kills: key_flow_name_only, fingerprint_no_version, fingerprint_const, key_no_flow, compute_drops_flow
    v, cache, st = clip / 'orig' / 'clip.mp4', tmp_path / 'c', M.EmbedStats()
    for f in ('dis', 'dis-fast', 'farneback'): _same(_mwe(v, cache, st, flow=f), _fresh(v, f))
    assert (st.computed, st.cached) == (3, 0)
    assert len({M.flow_fingerprint(f) for f in ('dis', 'dis-fast', 'farneback')}) == 3
    assert cv2.__version__ in M.flow_fingerprint('dis')
    monkeypatch.setattr(cv2, '__version__', cv2.__version__ + '-other')
    _mwe(v, cache, st, flow='dis')
    assert (st.computed, st.cached) == (4, 0)


def test_occlusion_mask_is_in_the_key_and_used(clip, tmp_path):
    "With the mask: its own file, and the masked numbers (not the unmasked ones) computed and read back."
    # kills: key_no_occlusion, compute_drops_occlusion
    v, cache, st = clip / 'orig' / 'clip.mp4', tmp_path / 'c', M.EmbedStats()
    plain = _mwe(v, cache, st)
    masked = _fresh(v, occlusion_mask=True)
    assert masked[0] != plain[0]
    _same(_mwe(v, cache, st, occlusion_mask=True), masked)
    _same(_mwe(v, cache, st, occlusion_mask=True), masked)
    assert (st.computed, st.cached) == (2, 1)


def test_content_not_path_is_the_key(clip, tmp_path):
    "A video rewritten under the same name (new bytes) is computed again; a byte-identical copy elsewhere is read."
    # kills: key_path_not_content, key_ignores_digest
    cache, st = tmp_path / 'c', M.EmbedStats()
    v = tmp_path / 'v.mp4'
    v.write_bytes((clip / 'orig' / 'clip.mp4').read_bytes())
    first = _mwe(v, cache, st)
    v.write_bytes((clip / 'ed' / 'clip.mp4').read_bytes())                  # same name, same length, new bytes
    _same(_mwe(v, cache, st), _fresh(clip / 'ed' / 'clip.mp4'))
    _same(_mwe(v, cache, st, digest=M.content_hash(v)), _fresh(clip / 'ed' / 'clip.mp4'))
    assert (st.computed, st.cached) == (2, 1)
    _same(_mwe(clip / 'orig' / 'clip.mp4', cache, st), first)            # the first bytes, under another name
    assert (st.computed, st.cached) == (2, 2)


# --- what is read back: checked, counted, and the same number -----------------------------------------------------------

def _only_file(cache: Path) -> Path:
    (f,) = cache.glob('warp-*.npz')
    return f


@pytest.mark.parametrize('planted', ['short', 'long', 'column'])
def test_a_file_that_does_not_fit_the_frames_is_computed_again(clip, tmp_path, planted):
    "A file with fewer or more errors than pairs, or a column of them, is not used: computed again and replaced."
    # kills: no_length_check (short), length_check_ge (long), no_ndim_check (column)
    v, cache, st = clip / 'orig' / 'clip.mp4', tmp_path / 'c', M.EmbedStats()
    e, p = _mwe(v, cache, st)
    bad = {'short': p[:3], 'long': np.r_[p, p], 'column': p[:, None]}[planted]
    np.savez(_only_file(cache), errors=bad)
    _same(_mwe(v, cache, st), (e, p))
    assert (st.computed, st.cached) == (2, 0)
    _same(_mwe(v, cache, st), (e, p))                                      # replaced by a whole one
    assert (st.computed, st.cached) == (2, 1)


def test_read_back_bit_for_bit_and_counted(clip, tmp_path, flows):
    "A hit computes no flow, counts one read (not a computation) and gives float64 errors equal to the fresh ones."
    # kills: hit_not_counted, hit_counted_computed, miss_not_counted, never_hit, store_float32, hit_returns_float32,
    #        hit_mean_float32
    v, cache, st = clip / 'ed' / 'clip.mp4', tmp_path / 'c', M.EmbedStats()
    fresh = _fresh(v)
    _same(_mwe(v, cache, st), fresh)
    assert (st.computed, st.cached) == (1, 0)
    n = len(flows)
    _same(_mwe(v, cache, st), fresh)
    _same(M.media_warp_error(v, cache_dir=cache, stats=st), fresh)          # no frames given: nothing read but the file
    assert (st.computed, st.cached) == (1, 2) and len(flows) == n
    assert np.load(_only_file(cache))['errors'].dtype == np.float64


def test_a_cached_nan_pair_is_left_out_of_the_mean(clip, tmp_path):
    "A pair with every pixel masked out is NaN: left out of the mean as `warp_error` leaves it out, cached or not."
    # kills: hit_mean_plain
    v, cache = clip / 'orig' / 'clip.mp4', tmp_path / 'c'
    e, p = _mwe(v, cache)
    p = p.copy(); p[2] = np.nan
    np.savez(_only_file(cache), errors=p)                                   # as an occlusion-masked run would store it
    e2, p2 = _mwe(v, cache)
    assert np.isnan(p2[2]) and e2 == M._warp_mean(p) and np.isfinite(e2)
    np.savez(_only_file(cache), errors=np.full_like(p, np.nan))
    assert np.isnan(_mwe(v, cache)[0])


def test_an_interrupted_computation_leaves_no_file(clip, tmp_path, monkeypatch):
    "Nothing is written before the errors are known: a computation that fails leaves no file a later call could trust."
    # kills: write_before_compute (its placeholder would be read back by a call without frames: no length to check)
    v, cache = clip / 'orig' / 'clip.mp4', tmp_path / 'c'
    def boom(*a, **k): raise KeyboardInterrupt
    monkeypatch.setattr(M, 'warp_error', boom)
    with pytest.raises(KeyboardInterrupt): _mwe(v, cache)
    assert not list(cache.glob('*warp-*'))
    monkeypatch.undo()
    _same(M.media_warp_error(v, cache_dir=cache), _fresh(v))


def test_a_failed_write_is_a_warning(clip, tmp_path, monkeypatch):
    "A full disk while writing the cache: one warning naming the file, the numbers still returned, nothing half written."
    # kills: write_fail_raises
    v, cache, st = clip / 'orig' / 'clip.mp4', tmp_path / 'c', M.EmbedStats()
    real = np.savez
    def full(f, **k):
        if 'errors' in k: raise OSError(28, 'No space left on device')
        return real(f, **k)
    monkeypatch.setattr(np, 'savez', full)
    with pytest.warns(UserWarning, match='could not write the warp error cache file .*No space left'):
        _same(_mwe(v, cache, st), _fresh(v))
    assert list(cache.iterdir()) == [] and (st.computed, st.cached) == (1, 0)


def test_unreadable_file_is_computed_again(clip, tmp_path):
    "A file that is not an npz at all (not merely cut short) is computed again."
    # kills: unreadable_crashes
    v, cache, st = clip / 'orig' / 'clip.mp4', tmp_path / 'c', M.EmbedStats()
    e = _mwe(v, cache, st)
    _only_file(cache).write_bytes(b'not an npz')
    _same(_mwe(v, cache, st), e)
    np.savez(_only_file(cache), other=np.zeros(3))                          # an npz without 'errors'
    _same(_mwe(v, cache, st), e)
    assert (st.computed, st.cached) == (3, 0)


def test_without_frames_it_reads_with_fps(clip, tmp_path):
    "No frames given: the video is read with `fps` and `max_frames`, as the key says."
    # kills: hit_ignores_frames_none_read
    v = clip / 'orig' / 'clip.mp4'
    _same(M.media_warp_error(v, fps=5), _fresh(v, fps=5))
    _same(M.media_warp_error(v, fps=5, cache_dir=tmp_path / 'c'), _fresh(v, fps=5))


def test_a_still_has_no_pair(clip, tmp_path):
    "One frame: NaN and no errors, cached as such (read back, not computed again)."
    # kills: still_nan_vs_empty
    st, cache = M.EmbedStats(), tmp_path / 'c'
    img = tmp_path / 's.png'
    cv2.imwrite(str(img), cv2.cvtColor(M.load_media(clip / 'orig' / 'clip.mp4', max_frames=1)[0], cv2.COLOR_RGB2BGR))
    for _ in range(2):
        e, p = _mwe(img, cache, st)
        assert np.isnan(e) and p.shape == (0,) and p.dtype == np.float64
    assert (st.computed, st.cached) == (1, 1)


def test_numpy_max_frames(clip, tmp_path):
    "`max_frames=np.int64(5)` passes `check_max_frames` (evaluate accepts it) but the cache key's json.dumps fails."
    # failed before its fix (a TypeError traceback from json.dumps; embed_media's key too): the keys hold `_read_settings`
    v = clip / 'orig' / 'clip.mp4'
    _same(_mwe(v, tmp_path / 'c', max_frames=np.int64(5)), _fresh(v, max_frames=5))


# --- evaluate: which digest, which settings, what is reported -----------------------------------------------------------

def _warps(r):
    return {m: {n: (v['warp_error'], v['warp_error_original']) for n, v in d['videos'].items()} for m, d in r['methods'].items()}


def test_evaluate_settings_reach_the_key(clip, tmp_path):
    """evaluate passes its fps, max_frames and occlusion mask to the cache: each run's numbers equal an uncached run's.
    fps 5 / 10 with max_frames 4 give 4 frames each (so no length check can tell them apart)."""
    # kills: we_drops_fps, we_drops_max_frames, we_drops_occlusion, edit_uses_orig_digest, orig_uses_edit_digest
    root, cache = clip, tmp_path / 'c'
    ev = lambda out, c, **kw: M.evaluate(root / 'orig', root / 'ed', tmp_path / out, cache_dir=c, progress=False, **kw)
    runs = [dict(fps=5, max_frames=4), dict(fps=10, max_frames=4), dict(max_frames=5), dict(), dict(max_frames=5),
            dict(occlusion_mask=True)]
    for i, kw in enumerate(runs):
        r = ev(f'c{i}', cache, **kw)
        assert _warps(r) == _warps(ev(f'u{i}', None, **kw)), kw
        w = _warps(r)['ed']['clip']
        assert w[0] != w[1]                                                  # the edit's and the original's own numbers
        assert r['warp_errors'] == ({'computed': 0, 'cached': 2} if i == 4 else {'computed': 2, 'cached': 0}), (kw, r['warp_errors'])


def test_cli_prints_the_counts_in_order(clip, tmp_path, capsys):
    "A first run computes the original's and the edit's warp errors; a second run with one more method reads both, computes one."
    # kills: cli_swaps_counts, report_counts_embed
    ed2 = tmp_path / 'ed2'; ed2.mkdir()
    fr = M.load_media(clip / 'orig' / 'clip.mp4')
    write_video(ed2 / 'clip.mp4', M.degrade(fr, 'blur'), 10, progress=False)
    args = ['evaluate', '--original', str(clip / 'orig'), '--cache-dir', str(tmp_path / 'c'), '--quiet']
    assert main(args + ['--edited', str(clip / 'ed'), '--out', str(tmp_path / 'o1')]) == 0
    assert 'warp errors 0 read, 2 computed' in capsys.readouterr().out
    assert main(args + ['--edited', str(clip / 'ed'), str(ed2), '--out', str(tmp_path / 'o2')]) == 0
    assert 'face embeddings 2 read, 1 computed; warp errors 2 read, 1 computed' in capsys.readouterr().out
    assert json.loads((tmp_path / 'o2' / 'metrics.json').read_text())['warp_errors'] == {'computed': 1, 'cached': 2}
