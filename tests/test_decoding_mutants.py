"""Mutation review of the damaged-file decoding (`read_video`/`VideoFrames` read again on one decoder thread, 'ONE', when frames are
flagged as concealed; a counting pass checking the size of the frames it skips) and of `warp_error` on a thread pool. Each test
kills mutants the other test files let live; its docstring names them. Files are real: the sample clip written by
`write_video` (12 frames, 320×180), damaged by overwriting three 16-byte runs past its first tenth (seed 0: frames 5, 8
and 9 flagged `is_corrupt` under 'AUTO', frame 0 not); the sample clip rotated by a display matrix; an HDR-tagged copy."""
import os, threading, time, warnings
import av, cv2, numpy as np, pytest

os.environ.setdefault('OMP_NUM_THREADS', '1')
from ipfacediff import metrics as M, video as V
from ipfacediff.utils import data_path
from ipfacediff.video import read_video, write_video, VideoFrames

CONCEALED = 'is damaged: the decoder concealed errors'


@pytest.fixture(scope='module')
def clip():
    fr = read_video(data_path('sample.mp4'), max_frames=12, progress=False)[0]
    return np.stack([cv2.resize(f, (320, 180), interpolation=cv2.INTER_AREA) for f in fr])


def _damage(path, out):
    b, rng = bytearray(path.read_bytes()), np.random.default_rng(0)
    for pos in rng.integers(len(b) // 10, len(b) - 100, size=3): b[pos:pos + 16] = rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
    out.write_bytes(bytes(b))
    return out


def _flags(path):
    "Per frame, whether the decoder flags it as concealed under 'AUTO'."
    with av.open(str(path)) as c:
        s = c.streams.video[0]; s.thread_type = 'AUTO'
        return [bool(f.is_corrupt) for f in c.decode(s)]


@pytest.fixture(scope='module')
def damaged(clip, tmp_path_factory):
    d = tmp_path_factory.mktemp('damaged')
    p = _damage(write_video(d / 'clean.mp4', clip, 10, progress=False), d / 'damaged.mp4')
    fl = _flags(p)
    assert any(fl) and not fl[0], fl          # concealed frames, none of them the first (the one a counting pass converts)
    with pytest.warns(UserWarning, match=CONCEALED): held = read_video(p, progress=False)[0]
    return p, held


@pytest.fixture(autouse=True)
def bounded_passes(monkeypatch):
    "At most 12 decoding passes a test: a counting loop that never ends fails instead of hanging."
    n, decode = [0], V._decode
    def bounded(*a, **k):
        n[0] += 1
        if n[0] > 12: raise AssertionError(f'{n[0]} decoding passes: a counting loop that does not end')
        return decode(*a, **k)
    monkeypatch.setattr(V, '_decode', bounded)


def _messages(w, text): return [str(x.message) for x in w if text in str(x.message)]


def test_counting_pass_sees_concealment_in_frames_it_does_not_convert(damaged):
    """Kills `concealed` counted only for converted frames: a counting pass converts frame 0 alone, so it saw no concealment
    when the damage is later, kept 'AUTO', and the first pass over the frames gave frame-threaded pixels (not `read_video`'s),
    warning only after them. `len` must warn, and the frames must be `read_video`'s."""
    p, held = damaged
    v = VideoFrames(p)
    with pytest.warns(UserWarning, match=CONCEALED): assert len(v) == len(held)      # (never switching: the loop never ends)
    with warnings.catch_warnings(): warnings.simplefilter('error'); got = np.stack(list(v))   # no second warning
    np.testing.assert_array_equal(got, held)


def test_plain_iteration_of_a_fresh_video_frames_counts_first(damaged):
    """Kills `_pass(rgb=True)` not counting first (`self.info`): `list(v)` asks `len` first and hid it, but a `for` loop over a
    fresh `VideoFrames` (as `warp_error`'s pairs or `crop_batches` read it) decoded on 'AUTO' and gave other pixels than
    `read_video`; so did `next(iter(v))` of the frames after a concealed one."""
    p, held = damaged
    with pytest.warns(UserWarning, match=CONCEALED): got = np.stack([f for f in VideoFrames(p)])
    np.testing.assert_array_equal(got, held)
    it = iter(VideoFrames(p))
    with pytest.warns(UserWarning, match=CONCEALED): first = next(it)
    np.testing.assert_array_equal(first, held[0]); it.close()


@pytest.fixture
def one_cpu():
    "The calling thread pinned to one CPU (FFmpeg's automatic thread count follows it): 'AUTO' and 'ONE' decode on one thread."
    if not hasattr(os, 'sched_setaffinity'): pytest.skip('no CPU affinity on this platform')
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(old)})
    try: yield
    finally: os.sched_setaffinity(0, old)


def test_on_one_cpu_one_warning_and_the_counting_ends(damaged, one_cpu, monkeypatch):
    """The 'ONE' re-read flags the concealed frames too (one thread conceals and says so), on one CPU as on many. Kills `read_video`
    warning after its 'ONE' pass too (two warnings), and `VideoFrames._pass` switching on any concealment, not only an
    'AUTO' pass's: on one CPU its 'ONE' counting pass never set `info`, and `info`'s while loop spun forever (here: more
    than 3 passes fail). The one-CPU frames agree held and streamed."""
    p, _ = damaged
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always'); held = read_video(p, progress=False)[0]
    assert len(_messages(w, CONCEALED)) == 1, _messages(w, CONCEALED)
    calls, decode = [], V._decode
    def counted(*a, **k):
        calls.append(k.get('threads', a[10] if len(a) > 10 else 'AUTO'))
        if len(calls) > 3: raise AssertionError(f'{len(calls)} decoding passes: {calls}')
        return decode(*a, **k)
    monkeypatch.setattr(V, '_decode', counted)
    v = VideoFrames(p)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always'); n = len(v); got = np.stack(list(v))
    assert len(_messages(w, CONCEALED)) == 1 and n == len(held)
    assert calls[0] == 'AUTO' and set(calls[1:]) == {'ONE'}, calls
    np.testing.assert_array_equal(got, held)


def test_counting_pass_converts_one_frame_of_a_rotated_video(clip, tmp_path, monkeypatch):
    """Kills `emit` comparing a skipped frame with the converted (upright) size instead of the decoder's: for a rotated video
    every skipped frame looked resized, so the counting pass converted them all (the cost it exists to avoid). One
    conversion for `len`; the frames are still `read_video`'s."""
    p = tmp_path / 'rot.mp4'
    stored = np.ascontiguousarray(np.rot90(clip, 1, axes=(1, 2)))
    with av.open(str(p), 'w') as c:
        s = c.add_stream('libx264', rate=10); s.width, s.height, s.pix_fmt = 180, 320, 'yuv420p'
        s.set_display_rotation(-90)
        for f in stored:
            for pk in s.encode(av.VideoFrame.from_ndarray(f, format='rgb24')): c.mux(pk)
        for pk in s.encode(): c.mux(pk)
    held, info = read_video(p, progress=False)
    assert info.rotation and held.shape[1:3] == (180, 320)
    n, upright = [0], V.upright
    def counted(img, rotation): n[0] += 1; return upright(img, rotation)
    monkeypatch.setattr(V, 'upright', counted)
    v = VideoFrames(p)
    assert len(v) == len(held) and n[0] == 1, n
    np.testing.assert_array_equal(np.stack(list(v)), held)


def test_hdr_warning_once_on_a_damaged_hdr_file(clip, tmp_path):
    """Kills the HDR warning on `VideoFrames`' second ('ONE') counting pass (`warn` = no `info` yet, whatever the
    threading): a damaged HDR file warned twice that it is HDR when streamed, once when held."""
    p = tmp_path / 'hdr.mp4'
    with av.open(str(p), 'w') as c:
        s = c.add_stream('libx264', rate=10, options={'x264-params': 'colorprim=bt2020:transfer=smpte2084:colormatrix=bt2020nc'})
        s.width, s.height, s.pix_fmt = 320, 180, 'yuv420p'
        for f in clip:
            for pk in s.encode(av.VideoFrame.from_ndarray(f, format='rgb24')): c.mux(pk)
        for pk in s.encode(): c.mux(pk)
    q = _damage(p, tmp_path / 'hdr_damaged.mp4')
    assert any(_flags(q))
    for read in (lambda: read_video(q, progress=False), lambda: len(VideoFrames(q))):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter('always'); read()
        assert len(_messages(w, 'is HDR video')) == 1 and len(_messages(w, CONCEALED)) == 1, [str(x.message)[:50] for x in w]


def test_warp_error_scale_follows_the_frames_not_the_flow_frames(clip):
    """Kills `scale` taken from the first flow frame instead of the first frame: uint8 frames with float flow frames were
    compared with `cur / 1.0` (errors near 100), float frames with uint8 flow frames with `cur / 255`. The flow frames' dtype
    changes nothing (the flow is computed on their uint8 grey either way)."""
    f, ff = clip[:5], clip[:5].astype(np.float32) / 255
    want = M.warp_error(f, 'dis-fast', flow_frames=f, return_per_frame=True, workers=1)[1]
    np.testing.assert_array_equal(M.warp_error(f, 'dis-fast', flow_frames=ff, return_per_frame=True, workers=1)[1], want)
    np.testing.assert_allclose(M.warp_error(ff, 'dis-fast', flow_frames=f, return_per_frame=True, workers=1)[1], want, atol=1e-6)


def test_raft_pairs_on_one_thread(clip, monkeypatch):
    """Kills RAFT scored on `workers` threads (one network, shared by every thread: its memory and batches multiplied):
    whatever `workers`, RAFT's flows come from one thread; DIS's from several (the pool is used)."""
    seen = {}
    def fake_flow(src, dst, method='dis'):
        seen.setdefault(method, set()).add(threading.get_ident()); time.sleep(0.01)
        return np.zeros((*np.shape(src)[:2], 2), np.float32)
    monkeypatch.setattr(M, 'compute_flow', fake_flow)
    f = clip[:, :40, :40]
    M.warp_error(f, 'raft', workers=4); M.warp_error(f, 'dis', workers=4)
    assert len(seen['raft']) == 1 and len(seen['dis']) > 1, {k: len(v) for k, v in seen.items()}


def test_a_damaged_file_reads_the_same_on_one_cpu_as_on_all(damaged):
    """Kills the re-read using FFmpeg's automatic thread count (slice threads: 3 on 2 CPUs, 1 on 1 CPU), which concealed the
    errors differently by machine: frames 5–11 of this file differed by up to 191 levels between 1 and 2 CPUs."""
    p, _ = damaged
    with warnings.catch_warnings():
        warnings.simplefilter('ignore'); many = read_video(p, progress=False)[0]
        old = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(old)})
        try: one = read_video(p, progress=False)[0]
        finally: os.sched_setaffinity(0, old)
    np.testing.assert_array_equal(one, many)
