"`evaluate(stream=True)` against `evaluate(stream=False)` on odd inputs: the same report, the same one-line errors."
import json, os, shutil
from fractions import Fraction
from pathlib import Path
import av, cv2, numpy as np, pytest

os.environ.setdefault('OMP_NUM_THREADS', '1')
from ipfacediff import metrics as M
from ipfacediff.utils import data_path, UserError
from ipfacediff.video import read_video, write_video, VideoFrames

from shared import evaluate_report


@pytest.fixture(scope='module')
def clip20():
    fr = read_video(data_path('sample.mp4'), max_frames=20, progress=False)[0]
    return np.stack([cv2.resize(f, (320, 180), interpolation=cv2.INTER_AREA) for f in fr])



def _both(orig, edited, tmp, **kw):
    "Held then streamed: each one's report (or its UserError's message) and whether --out was written."
    res = {}
    for stream in (False, True):
        out = tmp / f'out_{stream}'
        try: M.evaluate(orig, edited, out, progress=False, stream=stream, **kw); res[stream] = evaluate_report(out)
        except UserError as e: res[stream] = ('UserError', str(e), out.exists())
    return res[False], res[True]


def _ts(path, frames, first_pts, rate=10):
    "An MPEG-TS segment of `frames` whose timestamps start at frame `first_pts` (segments concatenate into one stream)."
    with av.open(str(path), 'w', format='mpegts') as c:
        s = c.add_stream('libx264', rate=rate, options={'bframes': '0'})
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], 'yuv420p'
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format='rgb24'); vf.pts, vf.time_base = first_pts + i, Fraction(1, rate)
            for p in s.encode(vf): c.mux(p)
        for p in s.encode(): c.mux(p)


def _size_change(path, frames, k):
    "A video whose frames are 320×180 up to frame `k` and 480×270 after (two TS segments back to back)."
    _ts(path.with_suffix('.a.ts'), frames[:k], 0)
    _ts(path.with_suffix('.b.ts'), np.stack([cv2.resize(f, (480, 270)) for f in frames[k:]]), k)
    path.write_bytes(path.with_suffix('.a.ts').read_bytes() + path.with_suffix('.b.ts').read_bytes())
    for s in ('.a.ts', '.b.ts'): path.with_suffix(s).unlink()
    return path


# ---------------------------------------------------------------- found by probing (each failed before its fix)

def test_frame_size_change_same_error_streamed(clip20, tmp_path):
    """`read_video` refuses a video whose frame size changes; `VideoFrames`' counting pass converted only the first
    frame, so it took it (a length, a shape), and the refusal came later, from the face search inside `embed_media`,
    which prefixes the file name: streamed, the one-line error read 'a.mpg: /…/a.mpg: the frame size changes …'."""
    for d in ('orig', 'ed'): (tmp_path / d).mkdir()
    write_video(tmp_path / 'orig' / 'a.mp4', clip20, 10, progress=False)
    p = _size_change(tmp_path / 'ed' / 'a.mpg', M.degrade(clip20, 'color', seed=1), 12)
    with pytest.raises(UserError, match='frame size changes'): read_video(p, progress=False)
    held, streamed = _both(tmp_path / 'orig', [tmp_path / 'ed'], tmp_path)
    assert held[0] == 'UserError' and held[2] is False
    assert streamed == held


def test_frame_size_change_in_gallery_same_warning_streamed(clip20, tmp_path):
    "(Same cause) a gallery item whose frame size changes was left out with another warning in metrics.json when streamed."
    for d in ('orig', 'ed', 'gal'): (tmp_path / d).mkdir()
    write_video(tmp_path / 'orig' / 'a.mp4', clip20, 10, progress=False)
    write_video(tmp_path / 'ed' / 'a.mp4', M.degrade(clip20, 'color', seed=1), 10, progress=False)
    _size_change(tmp_path / 'gal' / 'g.mpg', M.degrade(clip20, 'blur'), 12)
    held, streamed = _both(tmp_path / 'orig', [tmp_path / 'ed'], tmp_path, gallery=tmp_path / 'gal')
    assert isinstance(held, dict) and streamed == held


def test_damaged_but_decodable_video_decodes_alike_each_pass(clip20, tmp_path):
    """A damaged H.264 file that FFmpeg decodes with error concealment gave other pixels from pass to pass under frame
    threading (thread_type 'AUTO'), so a streamed evaluation (3–4 passes) scored it differently from a held one and from
    run to run. Now a file whose frames the decoder flags as concealed is decoded again on one thread ('SLICE'), held or
    streamed, with a warning. (Before the fix this failed with high probability, not certainty: thread timing.)"""
    p = write_video(tmp_path / 'e.mp4', M.degrade(clip20, 'color', seed=1), 10, progress=False)
    b, rng = bytearray(p.read_bytes()), np.random.default_rng(3)   # seed 3: decodes, with concealment
    for pos in rng.integers(len(b) // 10, len(b) - 100, size=4):
        for j in range(25): b[pos + j] = rng.integers(0, 256)
    p.write_bytes(bytes(b))
    with pytest.warns(UserWarning, match='is damaged: the decoder concealed errors in'): held = read_video(p, progress=False)[0]
    for _ in range(3): assert np.array_equal(read_video(p, progress=False)[0], held)
    v = VideoFrames(p)
    for _ in range(6): assert np.array_equal(np.stack(list(v)), held)


# ---------------------------------------------------------------- guards (pass)

def test_rotated_resampled_late_face_cache_shared(clip20, tmp_path):
    "Rotated original (display matrix), an edit one third shorter whose face shows from frame 6, --fps 5; the cache serves both modes."
    for d in ('orig', 'ed'): (tmp_path / d).mkdir()
    stored = np.ascontiguousarray(np.rot90(clip20, 1, axes=(1, 2)))
    with av.open(str(tmp_path / 'orig' / 'a.mp4'), 'w') as c:
        s = c.add_stream('libx264', rate=10, options={'crf': '0'}); s.width, s.height, s.pix_fmt = 180, 320, 'yuv420p'
        s.set_display_rotation(-90)
        for f in stored:
            for pk in s.encode(av.VideoFrame.from_ndarray(f, format='rgb24')): c.mux(pk)
        for pk in s.encode(): c.mux(pk)
    e = M.degrade(clip20[:14], 'color', seed=1); e[:6] = 90
    write_video(tmp_path / 'ed' / 'a.mp4', e, 10, progress=False)
    held, streamed = _both(tmp_path / 'orig', [tmp_path / 'ed'], tmp_path, fps=5, cache_dir=tmp_path / 'cache')
    assert isinstance(held, dict)
    strip = lambda r: {k: json.dumps({**json.loads(v), 'embeddings': None, 'warp_errors': None, 'decoding': None}) if k == 'metrics.json' else v for k, v in r.items()}
    assert json.loads(streamed['metrics.json'])['embeddings'] == {'computed': 0, 'cached': 2}     # the held run's cache
    assert strip(streamed) == strip(held)


def test_truncated_edit_same_error_nothing_written(clip20, tmp_path):
    for d in ('orig', 'ed'): (tmp_path / d).mkdir()
    write_video(tmp_path / 'orig' / 'a.mp4', clip20, 10, progress=False)
    full = write_video(tmp_path / 'full.mp4', M.degrade(clip20, 'color', seed=1), 10, audio_from=data_path('sample.mp4'), progress=False)
    (tmp_path / 'ed' / 'a.mp4').write_bytes(full.read_bytes()[:int(full.stat().st_size * 0.6)])
    held, streamed = _both(tmp_path / 'orig', [tmp_path / 'ed'], tmp_path)
    assert held[0] == 'UserError' and 'damaged or truncated' in held[1] and held[2] is False
    assert streamed == held
