"""`evaluate(cache_dir=...)` not decoding a video whose results are all cached: tests from a mutation review.

Each test names the mutants of `ipfacediff/metrics.py` (or `cache.py`) it kills. A video is left undecoded only when
every result taken from its frames is in the cache under the settings of this run (every recognizer, the occlusion mask,
fps, max_frames, and the edit's own boxes: the original's scaled to the edit's size); what the report then says of it
(frame count, (height, width), rate — none for a still) is what a read would have said, and the files it used are
marked used like any other cache hit."""
import errno, os, time, warnings
from pathlib import Path
import cv2, numpy as np, pytest, torch

os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
from ipfacediff import metrics as M, utils as U
from ipfacediff.cache import _kind_of
from ipfacediff.video import write_video

from shared import evaluate_numbers, orig_and_edit


class _MeanColour(torch.nn.Module):
    "A recognizer with no weights: the aligned crop's mean colour (fast)."
    name = 'mc'
    def forward(self, x): return x.mean((2, 3))


class _MaxColour(torch.nn.Module):
    "Another recognizer with no weights (another class: another cache key)."
    name = 'xc'
    def forward(self, x): return x.amax((2, 3))


def _run(root, out, cache, **kw):
    return M.evaluate(root / 'orig', root / 'ed', out, cache_dir=cache, progress=False, **kw)


@pytest.fixture(scope='module')
def resized(tmp_path_factory):
    """orig/clip.mp4 (12 frames, 320×180, 10 fps) with its edit ed/clip.mp4 at 256×144, and a still pair orig/face.png
    (320×180), ed/face.png (256×144); evaluated twice with one cache, every cache file made 60 days old in between.
    (root, cache, first report folder, second report folder, first result, second result, the files' ages after it in days)."""
    root = tmp_path_factory.mktemp('resized')
    fr = orig_and_edit(root, 12, (320, 180))
    ed = np.stack([cv2.resize(f, (256, 144), interpolation=cv2.INTER_AREA) for f in M.degrade(fr, 'color', seed=1)])
    (root / 'ed' / 'clip.mp4').unlink()
    write_video(root / 'ed' / 'clip.mp4', ed, 10, progress=False)
    cv2.imwrite(str(root / 'orig' / 'face.png'), cv2.cvtColor(fr[3], cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(root / 'ed' / 'face.png'), cv2.cvtColor(ed[3], cv2.COLOR_RGB2BGR))
    cache = root / 'cache'
    r1 = _run(root, root / 'r1', cache)
    old = time.time() - 60 * 86400
    for f in cache.iterdir(): os.utime(f, (old, old))
    r2 = _run(root, root / 'r2', cache)
    ages = {f.name: (time.time() - f.stat().st_mtime) / 86400 for f in cache.iterdir()}
    return root, cache, root / 'r1', root / 'r2', r1, r2, ages


def test_an_edit_at_another_size_is_not_decoded_again(resized):
    """The edit's embeddings are keyed by the original's boxes scaled to the edit's (height, width): the file written is
    the one that key names, and the second run finds it (both videos and both stills left undecoded, same report)."""
    # kills: embed_ref_orig_size (embed_media given the boxes scaled to the original's size: not the key `read` looks for,
    #        every edit at another size decoded on every run), read_ref_orig_size (`read` looks for the boxes scaled to the
    #        original's size), to_edit_no_scale (the original's boxes used unscaled on the edit's frames)
    root, cache, o1, o2, r1, r2, _ = resized
    assert r1['decoding'] == {'decoded': 4, 'skipped': 0}
    assert r2['decoding'] == {'decoded': 0, 'skipped': 4}, r2['decoding']
    assert r2['embeddings'] == {'computed': 0, 'cached': 4} and r2['warp_errors'] == {'computed': 0, 'cached': 4}
    assert evaluate_numbers(o2) == evaluate_numbers(o1)
    v = r1['methods']['ed']['videos']['clip']
    assert v['size_original'] == [180, 320] and v['size_edited'] == [144, 256] and v['face_found']
    embs = M._parse_recognizers('dlib')
    o = M.embed_media(root / 'orig' / 'clip.mp4', embs, cache)['dlib']
    want = M._scale_boxes(o.boxes, [180, 320], (144, 256))
    assert M._embedding_keys(cache, M.content_hash(root / 'ed' / 'clip.mp4'), embs, None, None, 512, want)['dlib'].is_file()


def test_a_still_pair_has_no_rate_when_not_decoded(resized):
    "A still's info: one frame, its (height, width), and no rate — None, not NaN, not 0 — in the report and the API alike."
    # kills: fps_none_zero (a still's missing rate stored as 0: 'fps_edited': 0.0 in the second report),
    #        fps_nan_kept (the stored NaN handed back as the rate, not None), size_wh
    root, cache, o1, o2, r1, r2, _ = resized
    for r in (r1, r2):
        v = r['methods']['ed']['videos']['face']
        assert (v['fps_original'], v['fps_edited'], v['n_frames_edited'], v['size_edited']) == (None, None, 1, [144, 256]), v
    assert evaluate_numbers(o2) == evaluate_numbers(o1)
    info = M.cached_media_info(cache, M.content_hash(root / 'ed' / 'face.png'))
    assert info == M.MediaInfo(1, (144, 256), None, ()), info
    info = M.cached_media_info(cache, M.content_hash(root / 'ed' / 'clip.mp4'))
    assert info == M.MediaInfo(12, (144, 256), 10.0, ()) and type(info.fps) is float, info


def test_a_run_that_decodes_nothing_marks_its_files_used(resized):
    "Every file the second run read (warp errors and embeddings) is marked used: `cache --older-than` keeps it."
    # kills: no_mark_used (a warp file that already holds the info read but its age left as it was)
    ages = resized[-1]
    assert any(n.startswith('warp-') for n in ages) and all(a < 1 for a in ages.values()), ages


def test_one_recognizer_missing_means_a_read(clip_and_still, tmp_path, reads):
    "A second recognizer whose embeddings are not cached yet: every video is read (one read each), none counted as skipped."
    # kills: any_emb (one recognizer's file found taken for all: counted 'not decoded', then decoded by embed_media anyway)
    folders, cache = clip_and_still[0], tmp_path / 'c'
    _run(folders, tmp_path / 'r1', cache, recognizers={'mc': _MeanColour()})
    reads.clear()
    r = _run(folders, tmp_path / 'r2', cache, recognizers={'mc': _MeanColour(), 'xc': _MaxColour()})
    assert r['decoding'] == {'decoded': 2, 'skipped': 0}, r['decoding']
    assert r['embeddings'] == {'computed': 3, 'cached': 3} and r['warp_errors'] == {'computed': 0, 'cached': 2}
    assert sorted(reads) == ['clip.mp4', 'clip.mp4', 'still.png'], reads


def test_the_run_settings_pick_the_info_and_the_embeddings(clip_and_still, tmp_path, reads):
    """With the occlusion mask the second run decodes nothing; with max_frames 6 after a full run, the info and the
    embeddings looked for are those of 6 frames: with the latter gone, the videos are read (and 6 frames reported)."""
    # kills: info_no_occlusion (the info looked for in the unmasked file: a masked run never skips),
    #        embkeys_no_fps_mf (the embeddings of all frames taken for those of 6: counted 'not decoded', decoded anyway)
    folders, cache = clip_and_still[0], tmp_path / 'c'
    kw = dict(recognizers={'mc': _MeanColour()}, occlusion_mask=True)
    assert _run(folders, tmp_path / 'r1', cache, **kw)['decoding'] == {'decoded': 2, 'skipped': 0}
    reads.clear()
    r = _run(folders, tmp_path / 'r2', cache, **kw)
    assert r['decoding'] == {'decoded': 0, 'skipped': 2} and reads == [], (r['decoding'], reads)
    before = set(cache.iterdir())
    assert _run(folders, tmp_path / 'r3', cache, max_frames=6, **kw)['decoding'] == {'decoded': 2, 'skipped': 0}
    for f in set(cache.iterdir()) - before:
        if not f.name.startswith('warp-'): f.unlink()                 # the 6-frame embeddings gone, their warp errors kept
    reads.clear()
    r = _run(folders, tmp_path / 'r4', cache, max_frames=6, **kw)
    assert r['decoding'] == {'decoded': 2, 'skipped': 0}, r['decoding']
    assert sorted(reads) == ['clip.mp4', 'clip.mp4', 'still.png'] and r['warp_errors'] == {'computed': 0, 'cached': 2}
    assert r['methods']['ed']['videos']['clip']['n_frames_edited'] == 6


def test_an_older_warp_file_that_cannot_gain_the_info_is_still_read_quietly(clip_and_still, tmp_path, monkeypatch):
    "A warp file from before the info was kept, on a disk where nothing can be written: read, used, and no warning of it."
    # kills: quiet_never (the failed upgrade of a file that was read fine warns on every run of a full or read-only cache)
    folders, cache = clip_and_still[0], tmp_path / 'c'
    r1 = _run(folders, tmp_path / 'r1', cache)
    for f in cache.glob('warp-*.npz'):
        with np.load(f) as z: e = z['errors']
        np.savez(f, errors=e)
    def full(*a, **k): raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(U, 'atomic_output', full)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        r2 = _run(folders, tmp_path / 'r2', cache)
    assert not [str(x.message) for x in w if 'could not write' in str(x.message)], [str(x.message) for x in w]
    assert r2['warp_errors'] == {'computed': 0, 'cached': 2} and r2['methods'] == r1['methods']
    assert all(M.cached_media_info(cache, M.content_hash(folders / d / 'clip.mp4')) is None for d in ('orig', 'ed'))


def test_a_warp_file_is_known_by_its_members(tmp_path):
    "`cache`'s kinds: a warp file holds its errors, and its info or not; nothing else, and never the info alone."
    # kills: kind_no_errors (a file of the info alone taken for warp errors), kind_any_superset (any members beside them)
    key = 'a' * 32
    def kind(**members):
        p = tmp_path / f'warp-{key}.npz'
        np.savez(p, **members)
        return _kind_of(p)
    e, info = np.zeros(3), dict(size=np.array([180, 320]), fps=np.array(10.0), warnings=np.array([], dtype=str))
    assert kind(errors=e) == 'warp' and kind(errors=e, **info) == 'warp'
    assert kind(**info) is None and kind(errors=e, frames=np.zeros(3), **info) is None


def test_every_warning_of_a_read_is_shown_once_and_again_when_not_decoded(clip_and_still, tmp_path, monkeypatch):
    "A read that warns twice: each warning shown once when read, and both again, in order, when the video is not decoded."
    # kills: replay_first_only (only the first of a video's warnings shown again), no_replay, no_store_warnings, no_reemit
    folders, cache = clip_and_still[0], tmp_path / 'c'
    real = M.media_frames
    def noisy(p, *a, **k):
        name = f'{Path(p).parent.name}/{Path(p).name}'
        warnings.warn(f'{name}: the first thing'); warnings.warn(f'{name}: the second thing')
        return real(p, *a, **k)
    def shown(**kw):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter('always')
            r = _run(folders, tmp_path / f'r{len(list(tmp_path.iterdir()))}', cache, **kw)
        return r['decoding'], [str(x.message) for x in w if 'clip.mp4: the' in str(x.message)]
    want = [f'{d}/clip.mp4: the {k} thing' for d in ('orig', 'ed') for k in ('first', 'second')]
    monkeypatch.setattr(M, 'media_frames', noisy)
    assert shown() == ({'decoded': 2, 'skipped': 0}, want)
    monkeypatch.setattr(M, 'media_frames', real)
    assert shown() == ({'decoded': 0, 'skipped': 2}, want)


# ---------------------------------------------------------------- the four bugs the review found (fixed)

def _warned(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        r = fn()
    return r, [(x.category.__name__, str(x.message)) for x in w]


def test_a_kept_warning_names_the_file_evaluated_now(clip_and_still, tmp_path, monkeypatch):
    "The same bytes under another name: the warning shown again names the file read now, not the one first read."
    import shutil
    a, b, cache = clip_and_still[0], tmp_path / 'b', tmp_path / 'c'
    for d in ('orig', 'ed'): (b / d).mkdir(parents=True); shutil.copy(a / d / 'clip.mp4', b / d / 'other.mp4')
    real = M.media_frames
    def noisy(p, *x, **k): warnings.warn(f'{Path(p).name} is odd ({p})'); return real(p, *x, **k)
    monkeypatch.setattr(M, 'media_frames', noisy)
    _run(a, tmp_path / 'r1', cache)
    monkeypatch.setattr(M, 'media_frames', real)
    r, w = _warned(lambda: M.evaluate(b / 'orig', b / 'ed', tmp_path / 'r2', cache_dir=cache, progress=False))
    assert r['decoding'] == {'decoded': 0, 'skipped': 2}
    assert [m for c, m in w if 'is odd' in m] == [f"other.mp4 is odd ({b / d / 'other.mp4'})" for d in ('orig', 'ed')], w


def test_another_librarys_warning_is_not_kept(clip_and_still, tmp_path, monkeypatch):
    "A ResourceWarning during a read (the default filters hide it) is not shown again, as a UserWarning, on every cached run."
    folders, cache, real = clip_and_still[0], tmp_path / 'c', M.media_frames
    def leaky(p, *x, **k): warnings.warn('unclosed file <_io.BufferedReader name=3>', ResourceWarning); return real(p, *x, **k)
    monkeypatch.setattr(M, 'media_frames', leaky)
    _run(folders, tmp_path / 'r1', cache)
    monkeypatch.setattr(M, 'media_frames', real)
    r, w = _warned(lambda: _run(folders, tmp_path / 'r2', cache))
    assert r['decoding'] == {'decoded': 0, 'skipped': 2} and not [m for c, m in w if 'unclosed' in m], w


def test_an_older_warp_file_is_marked_used_even_when_it_cannot_gain_the_info(clip_and_still, tmp_path, monkeypatch):
    "On a full disk the upgrade fails, but the warp file was read: its last use is now, or `cache --older-than` removes it."
    folders, cache = clip_and_still[0], tmp_path / 'c'
    _run(folders, tmp_path / 'r1', cache)
    old = time.time() - 60 * 86400
    for f in cache.glob('warp-*.npz'):
        with np.load(f) as z: e = z['errors']
        np.savez(f, errors=e); os.utime(f, (old, old))
    def full(*a, **k): raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(U, 'atomic_output', full)
    assert _run(folders, tmp_path / 'r2', cache)['warp_errors'] == {'computed': 0, 'cached': 2}
    assert all(time.time() - f.stat().st_mtime < 86400 for f in cache.glob('warp-*.npz'))


def test_a_damaged_embedding_file_means_a_read(clip_and_still, tmp_path, reads):
    "An embedding file that is there but cannot be read: the video is decoded, and counted so."
    folders, cache = clip_and_still[0], tmp_path / 'c'
    _run(folders, tmp_path / 'r1', cache)
    for f in cache.glob('[0-9a-f]*.npz'): f.write_bytes(b'not a zip')
    reads.clear()
    r = _run(folders, tmp_path / 'r2', cache)
    assert r['decoding'] == {'decoded': 2, 'skipped': 0} and sorted(reads) == ['clip.mp4', 'clip.mp4', 'still.png'], (r['decoding'], reads)


def test_a_warning_is_shown_as_often_cached_as_not(clip_and_still, tmp_path, monkeypatch):
    """Under Python's default filters a warning of the same text from the same place is shown once: reading the original
    and the edit (both HDR, say) says it once, and so does the cached run that reads neither (the review's finding)."""
    folders, cache, real = clip_and_still[0], tmp_path / 'c', M.media_frames
    def hdr(p, *x, **k): warnings.warn('this video is HDR'); return real(p, *x, **k)
    def count(i):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter('default'); warnings.resetwarnings(); warnings.simplefilter('default')
            r = _run(folders, tmp_path / f'r{i}', cache)
        return r['decoding'], sum('is HDR' in str(x.message) for x in w)
    monkeypatch.setattr(M, 'media_frames', hdr)
    assert count(1) == ({'decoded': 2, 'skipped': 0}, 1)
    monkeypatch.setattr(M, 'media_frames', real)
    assert count(2) == ({'decoded': 0, 'skipped': 2}, 1)


def test_a_kept_name_is_put_back_only_where_it_names_the_file(tmp_path):
    "A folder of images named '3' whose warnings say '3 frames': renamed, the counts stay counts; the names change."
    d = tmp_path / '3'; d.mkdir()
    for i in range(2): cv2.imwrite(str(d / f'{i:04d}.png'), np.full((8, 8, 3), 100 + i, np.uint8))
    real = M.media_frames
    def noisy(p, *a, **k):
        warnings.warn(f'{p}/0001.png holds 3 frames: only the first is read'); warnings.warn(f'{Path(p).name} is damaged: 3 frames')
        return real(p, *a, **k)
    try:
        M.media_frames = noisy
        with warnings.catch_warnings(record=True): warnings.simplefilter('always'); _, info = M.read_media(d)
    finally: M.media_frames = real
    assert info.warnings == ('{path}/0001.png holds 3 frames: only the first is read', '{name} is damaged: 3 frames'), info.warnings
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always'); M.replay_warnings(info, tmp_path / '7')
    assert [str(x.message) for x in w] == [f"{tmp_path / '7'}/0001.png holds 3 frames: only the first is read", '7 is damaged: 3 frames']
