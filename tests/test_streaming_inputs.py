"""Streamed edits (`edit(stream=True)`) against edits in memory on unusual inputs: rotated / mirrored / anamorphic /
variable-rate files, faces that vanish, HDR tags, damaged files, signals; and `VideoFrames` indexing against numpy's."""
import hashlib, os, signal, subprocess, sys, time, warnings
from fractions import Fraction
from pathlib import Path
import av, cv2, numpy as np, pytest

from ipfacediff.pipeline import IPFaceDiffPipeline, EditConfig
from ipfacediff.utils import data_path, UserError
from ipfacediff.video import read_video, write_video, upright, VideoFrames

from shared import STREAM_SMOKE as SMOKE, stream_and_hold as both, stream_pipe  # noqa: F401 (the `pipe` fixture)

@pytest.fixture(scope='module')
def sample12():
    return read_video(data_path('sample.mp4'), max_frames=12, progress=False)[0]

def _raw(path, stored, rate=10, deg=None, hflip=False, sar=None, pts=None, tb=None, color=None):
    "Encode `stored` losslessly with PyAV (independent of `write_video`), with the given display matrix / SAR / timestamps / tags."
    with av.open(str(path), 'w') as c:
        s = c.add_stream('libx264', rate=rate, options={'crf': '0'})
        s.width, s.height, s.pix_fmt = stored.shape[2], stored.shape[1], 'yuv420p'
        if deg is not None or hflip: s.set_display_rotation(deg or 0, hflip=hflip)
        if sar is not None: s.codec_context.sample_aspect_ratio = sar
        if tb is not None: s.time_base = tb; s.codec_context.time_base = tb
        if color: s.codec_context.color_primaries, s.codec_context.color_trc, s.codec_context.colorspace = color
        for i, f in enumerate(stored):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format='rgb24')
            if pts is not None: vf.pts, vf.time_base = int(pts[i]), tb
            for p in s.encode(vf): c.mux(p)
        for p in s.encode(): c.mux(p)
    return Path(path)

md5 = lambda p: hashlib.md5(Path(p).read_bytes()).hexdigest()

# ---------------------------------------------------------------- portrait (280 px wide) outputs: once not reproducible

@pytest.mark.parametrize('deg,hflip', [(-90, False), (0, True)])
def test_portrait_phone_video_stream_is_byte_identical(pipe, sample12, tmp_path, deg, hflip):
    """A phone's portrait clip (landscape frames + display matrix −90°, or a front camera's mirror matrix), 280×360 upright.
    The streamed and in-memory outputs differed (all frames, up to ~25 levels) although the frames handed to
    `VideoWriter.write` were identical: libx264's MB-tree rate control, now off (see test_write_video_is_reproducible_for_any_width)."""
    portrait = np.ascontiguousarray(sample12[:, :, 330:610])
    stored = np.stack([upright(f[:, ::-1] if hflip else f, -deg) for f in portrait])
    p = _raw(tmp_path / 'phone.mp4', stored, deg=deg, hflip=hflip)
    rs, rm = both(pipe, p, tmp_path)
    assert rs.n_frames == rm.n_frames == 12
    assert md5(tmp_path / 's.mp4') == md5(tmp_path / 'm.mp4')
    assert md5(tmp_path / 's_sbs.mp4') == md5(tmp_path / 'm_sbs.mp4')

def test_in_memory_edit_of_a_portrait_video_is_reproducible(pipe, sample12, tmp_path):
    "Even without --stream, the same edit of a 280-wide clip twice gave different bytes (and pixels): same seed, same file."
    portrait = np.ascontiguousarray(sample12[:, :, 330:610][:, :, ::-1])
    p = _raw(tmp_path / 'mirror.mp4', np.ascontiguousarray(portrait), deg=0, hflip=True)
    c = EditConfig('add glasses', **SMOKE)
    hashes = {md5(pipe.edit(p, c, out=tmp_path / f'm{k}.mp4', stream=False).out) for k in range(3)}
    assert len(hashes) == 1, hashes

def test_write_video_is_reproducible_for_any_width(sample12, tmp_path):
    """The root: with MB-tree on, `write_video` of the same frames 280 wide gave different files from one write to the next
    (intermittently; more often after torch work in the same process) — zero-filled input buffers and one encoder thread
    did not help, `mbtree=0` did."""
    import torch
    torch.nn.functional.conv2d(torch.randn(1, 3, 64, 64), torch.randn(8, 3, 3, 3))  # disturb the heap as an edit does
    junk = [np.random.randint(0, 255, 1 << 20, np.uint8) for _ in range(8)]
    fr = np.ascontiguousarray(sample12[:, :, 330:610][:, :, ::-1])
    hashes = set()
    for k in range(6):
        hashes.add(md5(write_video(tmp_path / 'x.mp4', [f.copy() for f in fr], 10, progress=False, overwrite=True)))
        junk[k] = np.random.randint(0, 255, 1 << 20, np.uint8)
    assert len(hashes) == 1, hashes

# ---------------------------------------------------------------- passing: what works

def test_anamorphic_stream_identical(pipe, sample12, tmp_path):
    squeezed = np.stack([cv2.resize(f, (480, 360)) for f in sample12])
    p = _raw(tmp_path / 'ana.mp4', squeezed, sar=Fraction(4, 3))
    rs, rm = both(pipe, p, tmp_path)
    assert rs.n_frames == 12 and read_video(tmp_path / 's.mp4', progress=False)[0].shape[1:3] == (360, 640)
    assert md5(tmp_path / 's.mp4') == md5(tmp_path / 'm.mp4') and md5(tmp_path / 's_sbs.mp4') == md5(tmp_path / 'm_sbs.mp4')

def test_variable_frame_rate_resampled_up(pipe, sample12, tmp_path):
    tb = Fraction(1, 1000)
    pts = np.concatenate([[0], np.cumsum([100, 50, 150, 100, 30, 170, 100, 100, 250, 40, 60])])
    p = _raw(tmp_path / 'vfr.mp4', sample12, pts=pts, tb=tb)
    for fps, mf in ((None, None), (23.976, 9)):
        d = tmp_path / f'{fps}'; d.mkdir()
        rs, rm = both(pipe, p, d, sbs=False, fps=fps, max_frames=mf)
        assert rs.fps == rm.fps and rs.n_frames == rm.n_frames
        assert md5(d / 's.mp4') == md5(d / 'm.mp4')

def test_face_only_in_the_middle_separate_caches(sample12, tmp_path):
    "Face frames 4–7 only, each mode with its own cache: the same span, warnings and bytes."
    f = sample12.copy(); f[:4] = 100; f[8:] = 60
    p = write_video(tmp_path / 'mid.mp4', f, 10, audio_from=data_path('sample.mp4'), progress=False)
    c, outs, warns = EditConfig('add glasses', **SMOKE, mask='head'), {}, {}
    for mode in (True, False):
        pipe = IPFaceDiffPipeline.tiny(0, cache_dir=tmp_path / f'cache{mode}', progress=False)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter('always')
            r = pipe.edit(p, c, out=tmp_path / f'{mode}.mp4', side_by_side=tmp_path / f'{mode}_sbs.mp4', stream=mode)
        outs[mode], warns[mode] = r, sorted(str(x.message) for x in w)
    assert outs[True].span == outs[False].span == (4, 8)
    assert warns[True] == warns[False]
    assert md5(tmp_path / 'True.mp4') == md5(tmp_path / 'False.mp4')
    assert md5(tmp_path / 'True_sbs.mp4') == md5(tmp_path / 'False_sbs.mp4')

def test_mkv_output_same_file(pipe, sample12, tmp_path):
    "An mkv edit streamed or held is the same file, byte for byte (the muxer writes no random segment UID: bitexact)."
    p = write_video(tmp_path / 'in.mp4', sample12[:6], 10, audio_from=data_path('sample.mp4'), progress=False)
    both(pipe, p, tmp_path, ext='.mkv')
    for a, b in (('s.mkv', 'm.mkv'), ('s_sbs.mkv', 'm_sbs.mkv')):
        assert md5(tmp_path / a) == md5(tmp_path / b), a
        assert len(read_video(tmp_path / a, progress=False)[0]) == 6

def test_hdr_warning_once_per_edit(pipe, sample12, tmp_path):
    p = _raw(tmp_path / 'hlg.mp4', sample12[:5], color=(9, 18, 9))
    for stream in (True, False):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter('always')
            pipe.edit(p, EditConfig('x', **SMOKE), out=tmp_path / f'{stream}.mp4', stream=stream)
        assert sum('HDR video' in str(x.message) for x in w) == 1, stream
    assert md5(tmp_path / 'True.mp4') == md5(tmp_path / 'False.mp4')

def test_truncated_input_same_error_nothing_written(pipe, tmp_path):
    src = write_video(tmp_path / 'full.mp4', read_video(data_path('sample.mp4'), max_frames=12, progress=False)[0], 10,
                      audio_from=data_path('sample.mp4'), progress=False)
    b = src.read_bytes(); p = tmp_path / 'cut.mp4'; p.write_bytes(b[:int(len(b) * 0.8)])
    msgs = []
    for stream in (True, False):
        with pytest.raises(UserError) as e:
            pipe.edit(p, EditConfig('x', **SMOKE), out=tmp_path / 'o.mp4', side_by_side=tmp_path / 'sbs.mp4', stream=stream)
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1] and 'damaged or truncated' in msgs[0]
    assert sorted(x.name for x in tmp_path.iterdir()) == ['cut.mp4', 'full.mp4']

@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_streamed_write_leaves_nothing(tmp_path, sig):
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1', 'IPFACEDIFF_CACHE': str(tmp_path / 'cache')}
    work = tmp_path / 'w'; work.mkdir()
    p = subprocess.Popen([sys.executable, '-m', 'ipfacediff.cli', 'edit', str(data_path('sample.mp4')), '--prompt', 'x', '--tiny',
                          '--size', '64', '--steps', '2', '--inversion-steps', '2', '--max-frames', '16', '--out', 'o.mp4',
                          '--side-by-side', 's.mp4', '--quiet', '--stream'], cwd=work, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while not any(work.iterdir()) and time.time() - t0 < 60 and p.poll() is None: time.sleep(0.02)   # the temporary files: writing
    time.sleep(0.2); p.send_signal(sig); out = p.communicate(timeout=60)[0]
    assert p.returncode == (130 if sig == signal.SIGINT else 143), out[-2000:]
    assert list(work.iterdir()) == []

EXPRS = ['X[0]', 'X[-1]', 'X[-7]', 'X[np.int64(3)]', 'X[2:5]', 'X[5:2]', 'X[-3:]', 'X[:-3]', 'X[100:]', 'X[-100:2]', 'X[2:2]',
         'X[2:6][1:3]', 'X[2:6][-1]', 'X[2:6][-4]', 'X[2:6][5:1]', 'X[2:6][-2:]', 'X[2:6][1:3][-1]', 'X[2:6][10:20]', 'X[2:6][-10:]',
         'X[6:2][0:1]', 'X[7]', 'X[-8]', 'X[2:6][4]', 'X[2:6][-5]']

def test_video_frames_index_like_numpy(tmp_path, sample12):
    p = write_video(tmp_path / 'v.mp4', sample12[:7], 10, progress=False)
    A, V = read_video(p, progress=False)[0], VideoFrames(p)
    for e in EXPRS:
        try: a = eval(e, {'X': A, 'np': np})
        except IndexError:
            with pytest.raises(IndexError): eval(e, {'X': V, 'np': np})
            continue
        v = eval(e, {'X': V, 'np': np})
        assert len(np.shape(a)) == len(v.shape) and tuple(a.shape) == tuple(np.shape(v) if isinstance(v, np.ndarray) else v.shape), e
        got = v if isinstance(v, np.ndarray) else (np.stack(list(v)) if len(v) else np.empty(a.shape, np.uint8))
        assert (got == a).all(), e

# ---------------------------------------------------------------- damaged but decodable: concealed the same way every time

def test_damaged_decodable_video_edits_to_one_file(pipe, sample12, tmp_path):
    """A file with a few random bytes in its frames decodes with error concealment, which under frame-parallel decoding
    varied with thread timing: the streamed edit (several decoding passes) and the held one, and two held ones, could differ.
    Such a file is now read on one thread, with a warning, and every edit of it is the same file."""
    p = write_video(tmp_path / 'clean.mp4', sample12, 10, progress=False)
    b, rng = bytearray(p.read_bytes()), np.random.default_rng(0)
    for pos in rng.integers(len(b) // 10, len(b) - 100, size=3): b[pos:pos + 16] = rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
    (tmp_path / 'damaged.mp4').write_bytes(bytes(b))
    with pytest.warns(UserWarning, match='damaged.mp4 is damaged: the decoder concealed errors'):
        both(pipe, tmp_path / 'damaged.mp4', tmp_path)
    again = pipe.edit(tmp_path / 'damaged.mp4', EditConfig('add glasses', **SMOKE), out=tmp_path / 'again.mp4', stream=False).out
    assert md5(tmp_path / 's.mp4') == md5(tmp_path / 'm.mp4') == md5(again)
    assert md5(tmp_path / 's_sbs.mp4') == md5(tmp_path / 'm_sbs.mp4')
