"""Timing, memory and argument checks for ipfacediff.video on synthetic clips made with PyAV:
audio that starts before/after the picture, variable-frame-rate video, peak memory of read_video and
write_side_by_side, bad fps/max_frames/start."""
import os, subprocess, sys, textwrap, tracemalloc
os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
from fractions import Fraction
import av, numpy as np, pytest
from ipfacediff.utils import UserError, data_path
from ipfacediff.video import read_video, write_video, write_side_by_side, side_by_side, _load_audio, _EXACT_RGB
from av.video.reformatter import Interpolation


def _ramp(n, h=32, w=48):
    "Frame i is a flat grey of level 8*i: its id can be read back from the pixels."
    return np.broadcast_to((np.arange(n) * 8 % 256).astype(np.uint8)[:, None, None, None], (n, h, w, 3)).copy()

def _ids(frames): return np.round(frames.reshape(len(frames), -1).mean(1) / 8).astype(int)

def _write_timed(path, frames, times, audio=None, audio_at=0.0, video_at=0.0, arate=48000):
    "Lossless H.264 with frame i at `video_at + times[i]` s (ms steps); mono float `audio` from `audio_at` s as AAC."
    with av.open(str(path), 'w') as c:
        s = c.add_stream('libx264', rate=30, options={'crf': '0', 'bframes': '0'})
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], 'yuv420p'
        s.codec_context.time_base = Fraction(1, 1000)
        a = c.add_stream('aac', rate=arate, layout='mono') if audio is not None else None
        for f, t in zip(frames, times):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format='rgb24')
            vf.pts, vf.time_base = round((video_at + t) * 1000), Fraction(1, 1000)
            for p in s.encode(vf): c.mux(p)
        for p in s.encode(): c.mux(p)
        if a is None: return
        for i in range(0, len(audio), 1024):
            af = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio[None, i:i + 1024]), format='fltp', layout='mono')
            af.sample_rate, af.pts, af.time_base = arate, round(audio_at * arate) + i, Fraction(1, arate)
            for p in a.encode(af): c.mux(p)
        for p in a.encode(): c.mux(p)

def _encode(path, frames, rate, codec='libx264', options=None):
    "Constant-rate clip written the ordinary way (libx264 uses B-frames by default)."
    with av.open(str(path), 'w') as c:
        s = c.add_stream(codec, rate=rate, options=options or {})
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], 'yuv420p'
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format='rgb24')): c.mux(p)
        for p in s.encode(): c.mux(p)

def _tone(seconds, at, rate=48000):
    "`seconds` of silence with 0.2 s of a 1 kHz tone (amplitude 0.5) from `at` s on."
    x = np.zeros(round(seconds * rate), np.float32); i = round(at * rate)
    x[i:i + rate // 5] = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(rate // 5) / rate)
    return x

def _onset_in(path):
    "Time (s, from the start of the video stream) where the audio of `path` first gets loud, by its timestamps."
    with av.open(str(path)) as c:
        v = c.streams.video[0]; v0 = float(v.start_time * v.time_base)
        for fr in c.decode(audio=0):
            loud = np.nonzero(np.abs(fr.to_ndarray()).max(0) > 0.1)[0]
            if len(loud): return float(fr.pts * fr.time_base) + loud[0] / fr.sample_rate - v0


# ---------------------------------------------------------------- audio that does not start with the picture

@pytest.mark.parametrize('audio_at,video_at', [(0.48, 0.0), (0.0, 0.3)], ids=['audio-late', 'audio-early'])
def test_audio_offset_stays_in_sync(tmp_path, audio_at, video_at):
    src = tmp_path / 'src.mp4'                                       # a tone at 1.5 s of video time
    _write_timed(src, _ramp(30), np.arange(30) / 10, audio=_tone(3.5, video_at + 1.5 - audio_at), audio_at=audio_at, video_at=video_at)
    assert abs(_onset_in(src) - 1.5) < 0.01                          # the clip is what we meant
    a, rate, _ = _load_audio(src, 0.0, 3.0)
    assert a.shape == (1, 3 * rate)
    assert abs(np.nonzero(np.abs(a[0]) > 0.1)[0][0] / rate - 1.5) < 0.01
    if audio_at > 0: assert np.abs(a[:, :round(0.45 * rate)]).max() == 0   # silence where there was no audio yet
    frames, info = read_video(src, progress=False)
    out = write_video(tmp_path / 'out.mp4', frames, info.fps, audio_from=src, progress=False)
    assert abs(_onset_in(out) - 1.5) < 0.01, _onset_in(out)          # was 1.04 (late audio) / 1.80 (early audio)
    frames, info = read_video(src, fps=10, start=1.0, progress=False)
    out = write_video(tmp_path / 'cut.mp4', frames, info.fps, audio_from=src, audio_start=info.start, progress=False)
    assert abs(_onset_in(out) - 0.5) < 0.01, _onset_in(out)
    with av.open(str(out)) as c:
        a = c.streams.audio[0]; assert abs(float(a.duration * a.time_base) - len(frames) / 10) < 0.05


# ---------------------------------------------------------------- variable frame rate

def test_variable_frame_rate_lands_on_its_timestamps(tmp_path):
    times = np.r_[np.arange(15) / 30, 0.5 + np.arange(15) / 10]      # 30 fps for 0.5 s, then 10 fps
    _write_timed(tmp_path / 'vfr.mp4', _ramp(30), times)
    frames, info = read_video(tmp_path / 'vfr.mp4', progress=False)
    got, at = _ids(frames), np.arange(len(frames)) / info.fps
    assert 15 < info.fps < 16                                         # the source's average rate
    assert (got == np.abs(times[None] - at[:, None]).argmin(1)).all()  # each output time: the nearest frame
    assert abs(at[got == 15][0] - 0.5) < 0.02                         # was labelled 0.97 s
    assert abs(at[-1] - times[-1]) < 0.5 / info.fps and got[0] == 0 and got[-1] == 29
    assert abs(info.duration - 1.93) < 0.05


def test_constant_frame_rate_comes_out_unchanged(tmp_path):
    "Every frame once, the same pixels PyAV decodes (with read_video's conversion flags) — for the shipped sample and two common constant rates."
    long = np.broadcast_to((np.arange(120) % 32 * 8).astype(np.uint8)[:, None, None, None], (120, 36, 64, 3)).copy()
    _encode(tmp_path / 'ntsc.mp4', long, Fraction(24000, 1001))       # B-frames, timestamps rounded to 1/24000
    _encode(tmp_path / 'ntsc.mkv', long, Fraction(30000, 1001))       # millisecond timestamps
    for p in (data_path('sample.mp4'), tmp_path / 'ntsc.mp4', tmp_path / 'ntsc.mkv'):
        with av.open(str(p)) as c:
            s = c.streams.video[0]
            rate, decoded = float(s.average_rate), [(float(f.pts * s.time_base), f.to_ndarray(format='rgb24', interpolation=Interpolation.BILINEAR | _EXACT_RGB))
                                                     for f in c.decode(s)]
        direct = np.stack([f for _, f in decoded])
        frames, info = read_video(p, progress=False)
        assert frames.shape == direct.shape and (frames == direct).all(), p
        assert info.fps == rate and info.start == 0
        later, info = read_video(p, start=1.3, progress=False)        # from the first frame at/after 1.3 s
        first = next(i for i, (t, _) in enumerate(decoded) if t >= 1.3 - 1e-6)
        assert (later == direct[first:]).all() and abs(info.start - decoded[first][0]) < 1e-6, p


# ---------------------------------------------------------------- memory

def test_read_video_peak_memory_is_one_copy(tmp_path):
    "The peak resident memory of read_video is about the frames it returns, not a list of them plus a stacked copy."
    if not os.access('/proc/self/clear_refs', os.W_OK): pytest.skip('needs Linux /proc/self/clear_refs to reset the peak')
    n, h, w = 30, 720, 1280
    yy, xx = np.mgrid[0:h, 0:w]
    frames = np.stack([np.stack([(xx + 4 * i) % 256, (yy + 2 * i) % 256, np.full_like(xx, 8 * i)], -1) for i in range(n)]).astype(np.uint8)
    _encode(tmp_path / 'hd.mp4', frames, 30, options={'preset': 'ultrafast'})
    child = textwrap.dedent('''
        import sys
        from ipfacediff.video import read_video
        def status(key):
            for line in open('/proc/self/status'):
                if line.startswith(key): return int(line.split()[1]) * 1024
        read_video(sys.argv[1], max_frames=2, progress=False)      # load the decoder's libraries first
        open('/proc/self/clear_refs', 'w').write('5')               # peak (VmHWM) := current size
        base = status('VmRSS')
        frames, _ = read_video(sys.argv[1], progress=False)
        print((status('VmHWM') - base) / frames.nbytes)
    ''')
    r = subprocess.run([sys.executable, '-c', child, str(tmp_path / 'hd.mp4')], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ratio = float(r.stdout.split()[-1])
    assert ratio < 1.4, f'peak memory {ratio:.2f}x the frames (2.0x with a list and np.stack)'


def test_side_by_side_is_written_one_frame_at_a_time(tmp_path):
    frames = read_video(data_path('sample.mp4'), progress=False)[0]
    edited = 255 - frames
    whole = side_by_side(frames[:3], edited[:3])                      # the array form still exists
    assert whole.shape == (3, 360, 1280, 3)
    tracemalloc.start()
    try:
        out = write_side_by_side(tmp_path / 'sbs.mp4', frames, edited, 10, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally: tracemalloc.stop()
    full = 2 * frames.nbytes                                          # the double-width clip, 52.7 MiB
    assert peak < 0.2 * full, f'{peak / 2**20:.1f} MiB while writing (was ~2x the {full / 2**20:.1f} MiB clip)'
    back, info = read_video(out, progress=False)
    assert back.shape == (40, 360, 1280, 3)
    assert np.abs(back[:3].astype(int) - whole).mean() < 3            # same frames as side_by_side
    with pytest.raises(UserError, match='equal length'): write_side_by_side(tmp_path / 'x.mp4', frames[:3], frames[:2], 10)


# ---------------------------------------------------------------- arguments

@pytest.mark.parametrize('kw,msg', [
    (dict(fps=float('inf')), 'fps must be a finite number above 0'), (dict(fps=float('nan')), 'got nan'),
    (dict(fps=0), 'above 0'), (dict(fps=-2), 'got -2'),
    (dict(max_frames=0), 'max_frames must be a whole number of at least 1'), (dict(max_frames=-1), 'got -1'),
    (dict(max_frames=2.5), 'got 2.5'), (dict(start=-1.0), 'start must be a time in seconds, 0 or more'),
    (dict(start=float('nan')), 'got nan')])
def test_read_video_rejects_bad_arguments(kw, msg):
    with pytest.raises(UserError, match=msg): read_video(data_path('sample.mp4'), progress=False, **kw)


def test_good_arguments_still_work():
    frames, info = read_video(data_path('sample.mp4'), fps=np.float32(5), max_frames=np.int64(3), progress=False)
    assert frames.shape[0] == 3 and info.fps == 5.0
    assert read_video(data_path('sample.mp4'), max_frames=1, progress=False)[0].shape[0] == 1


def test_write_video_rejects_bad_fps(tmp_path):
    frames = _ramp(2)
    for fps in (float('inf'), float('nan'), 0, -1):
        with pytest.raises(UserError, match='fps must be a finite number above 0'): write_video(tmp_path / 'x.mp4', frames, fps, progress=False)
    assert not list(tmp_path.iterdir())


def test_frame_size_change_is_a_user_error(tmp_path):
    "Two raw H.264 streams of different sizes back to back: the decoder changes size half-way."
    parts = []
    for h, w in ((32, 48), (64, 96)):
        with av.open(str(tmp_path / 'part.h264'), 'w', format='h264') as c:
            s = c.add_stream('libx264', rate=10); s.width, s.height, s.pix_fmt = w, h, 'yuv420p'
            for f in _ramp(3, h, w):
                for p in s.encode(av.VideoFrame.from_ndarray(f, format='rgb24')): c.mux(p)
            for p in s.encode(): c.mux(p)
        parts.append((tmp_path / 'part.h264').read_bytes())
    (tmp_path / 'sizes.h264').write_bytes(b''.join(parts))
    with pytest.raises(UserError, match='frame size changes from 48x32 to 96x64 at frame 3'):
        read_video(tmp_path / 'sizes.h264', progress=False)
    # a VideoFrames' counting pass converts only the first frame: it must refuse the file all the same, with the same words
    from ipfacediff.video import VideoFrames
    with pytest.raises(UserError, match=f'^{tmp_path / "sizes.h264"}: the frame size changes from 48x32 to 96x64 at frame 3'):
        len(VideoFrames(tmp_path / 'sizes.h264'))
    with pytest.raises(UserError, match='frame size changes from 48x32 to 96x64 at frame 3'):
        next(iter(VideoFrames(tmp_path / 'sizes.h264')[4:5]))          # frames skipped before a span: checked too
