"""Invariants of the writing side of `ipfacediff.video` that no other test pinned down (mutation review of `_load_audio`,
`_check_frames`, `VideoWriter`, `write_video` and the side-by-side view: each test fails on at least one code change
that the notebook's checks and the rest of tests/ let through). What they pin: a channel layout the AAC encoder takes
is kept by name (quad stays quad, not 4.0); a clip without sound gives a silent video without a warning; the *first*
audio stream is the one copied; audio resampled to an AAC rate keeps its last samples; .mov and upper-case .MP4/.MOV
names get their index first too; a frame odd in one direction only is padded in that direction, at the bottom/right,
the picture left in place; frames too *tall* for libx264 are a one-line UserError that leaves no file; frames that are
not 3-channel RGB are refused by name; side by side: the gap is black and kept when written, each label stays in its
own panel (an empty one draws nothing), no frames is a UserError, and `write_side_by_side` cuts the audio at
`audio_start`. Tiny synthetic clips made with PyAV, offline, one core."""
import os, warnings
os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import av, numpy as np, pytest

from shared import top_boxes
from ipfacediff.utils import UserError
from ipfacediff.video import _load_audio, read_video, side_by_side, write_side_by_side, write_video


# ---------------------------------------------------------------- helpers

def _clip(path, tracks=(), n_frames=10, fps=10, fmt=None):
    """`n_frames` black 32×32 frames at `fps`, and one 16-bit PCM track per `(samples (channels, n) float, rate, layout)`
    of `tracks`, all starting at 0 s."""
    with av.open(str(path), 'w', format=fmt) as c:
        v = c.add_stream('libx264', rate=fps); v.width, v.height, v.pix_fmt = 32, 32, 'yuv420p'
        streams = [(c.add_stream('pcm_s16le', rate=rate, layout=layout), x, rate) for x, rate, layout in tracks]
        for i in range(n_frames):
            f = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format='rgb24'); f.pts = i
            for p in v.encode(f): c.mux(p)
        for p in v.encode(): c.mux(p)
        for s, x, rate in streams:
            for i in range(0, x.shape[1], 1024):
                part = (np.ascontiguousarray(x[:, i:i + 1024].T).reshape(1, -1) * 32767).astype(np.int16)
                af = av.AudioFrame.from_ndarray(part, format='s16', layout=s.layout.name)
                af.sample_rate, af.pts = rate, i
                for p in s.encode(af): c.mux(p)
            for p in s.encode(): c.mux(p)
    return path

def _tones(freqs, seconds, rate=48000):
    "Channel k a sine of `freqs[k]` Hz (0: silence), amplitude 0.3."
    t = np.arange(round(seconds * rate)) / rate
    return np.stack([0.3 * np.sin(2 * np.pi * f * t) for f in freqs]).astype(np.float32)

def _peak_hz(x, rate):
    "The strongest frequency of `x` (1 Hz bins over its first second)."
    return int(np.argmax(np.abs(np.fft.rfft(x[:rate], n=rate))))

def _decoded_audio(path):
    "The first audio stream of `path` decoded independently of `_load_audio`: `(channels, n)` float, rate, start (s, from the video's start)."
    with av.open(str(path)) as c:
        v = c.streams.video[0]; v0 = float(v.start_time * v.time_base)
        frs = list(c.decode(audio=0))
    x = np.concatenate([f.to_ndarray().reshape(len(f.layout.channels), -1) if f.format.is_planar
                        else f.to_ndarray().reshape(-1, len(f.layout.channels)).T for f in frs], 1)
    return x, frs[0].sample_rate, float(frs[0].pts * frs[0].time_base) - v0

# ---------------------------------------------------------------- the audio copied from `audio_from`

def test_a_layout_the_encoder_takes_is_kept_by_name(tmp_path):
    "A quad recording (FL FR BL BR) stays quad: not re-labelled 4.0 (FL FR FC BC), which would move the back-left channel to the centre."
    src = _clip(tmp_path / 'quad.mov', [(_tones([300, 400, 500, 600], 1.0), 48000, 'quad')], fmt='mov')
    with av.open(str(src)) as c: assert c.streams.audio[0].codec_context.layout.name == 'quad'     # the clip is what we meant
    out = write_video(tmp_path / 'o.mp4', np.zeros((10, 32, 32, 3), np.uint8), 10, audio_from=src, progress=False)
    with av.open(str(out)) as c: assert c.streams.audio[0].codec_context.layout.name == 'quad'
    x, rate, _ = _decoded_audio(out)
    assert [_peak_hz(ch, rate) for ch in x] == [300, 400, 500, 600]                                # each channel in its place


def test_audio_from_a_clip_without_sound_writes_a_silent_video_without_a_warning(tmp_path):
    "No audio stream is not an audio stream FFmpeg cannot decode: nothing to say, and no audio track."
    src = _clip(tmp_path / 'silent.mp4')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        out = write_video(tmp_path / 'o.mp4', np.zeros((4, 32, 32, 3), np.uint8), 10, audio_from=src, progress=False)
    assert [str(w.message) for w in caught] == []
    with av.open(str(out)) as c: assert len(c.streams.audio) == 0 and len(c.streams.video) == 1


def test_the_first_of_two_audio_tracks_is_copied(tmp_path):
    "A clip with two sound tracks (a 440 Hz one, then a 1 kHz commentary): the first one is the clip's sound."
    src = _clip(tmp_path / 'two.mkv', [(_tones([440], 1.0), 48000, 'mono'), (_tones([1000], 1.0), 48000, 'mono')], fmt='matroska')
    out = write_video(tmp_path / 'o.mp4', np.zeros((10, 32, 32, 3), np.uint8), 10, audio_from=src, progress=False)
    x, rate, _ = _decoded_audio(out)
    assert _peak_hz(x[0], rate) == 440


def test_audio_resampled_to_an_aac_rate_keeps_its_last_samples(tmp_path):
    "1 s of sound at 37.8 kHz (not an AAC rate) cut to 1 s: exactly 1 s at 32 kHz, the tone to the end (the resampler's tail kept)."
    src = _clip(tmp_path / 'cd.mkv', [(_tones([440], 1.0, 37800), 37800, 'mono')], fmt='matroska')
    a, rate, layout = _load_audio(src, 0.0, 1.0)
    assert (rate, layout, a.shape) == (32000, 'mono', (1, 32000))
    assert np.abs(a[0, -160:]).max() > 0.2                                                       # the last 5 ms still sound


@pytest.mark.parametrize('audio_start', [0.0, 1.0])
def test_write_side_by_side_cuts_the_audio_at_audio_start(tmp_path, audio_start):
    "A tone at 1.5 s of a 3 s clip: in a side-by-side of the frames from `audio_start` on, it sounds at 1.5 - audio_start."
    sound = np.zeros((1, 3 * 48000), np.float32); sound[0, 72000:72000 + 9600] = _tones([1000], 0.2)[0]
    src = _clip(tmp_path / 'src.mkv', [(sound, 48000, 'mono')], n_frames=30, fmt='matroska')
    frames = np.zeros((20, 16, 16, 3), np.uint8)                                                  # 2 s of frames
    out = write_side_by_side(tmp_path / 'sbs.mp4', frames, frames, 10, labels=None, audio_from=src, audio_start=audio_start, progress=False)
    x, rate, t0 = _decoded_audio(out)
    onset = t0 + np.nonzero(np.abs(x).max(0) > 0.1)[0][0] / rate
    assert abs(onset - (1.5 - audio_start)) < 0.01, onset


# ---------------------------------------------------------------- the file

@pytest.mark.parametrize('name', ['a.mov', 'B.MOV', 'C.MP4'])
def test_quicktime_family_outputs_have_their_index_first(tmp_path, name):
    "A .mov, or a camera's upper-case EDIT.MP4 / CLIP.MOV, plays while downloading as edit.mp4 does: moov before mdat."
    boxes = top_boxes(write_video(tmp_path / name, np.zeros((3, 16, 16, 3), np.uint8), 10, progress=False))
    assert 'moov' in boxes and 'mdat' in boxes and boxes.index('moov') < boxes.index('mdat'), boxes


@pytest.mark.parametrize('h,w', [(17, 24), (24, 17)])
def test_a_size_odd_one_way_is_padded_that_way_at_the_end_and_the_picture_stays(tmp_path, h, w):
    "17×24: one row added at the bottom (a copy of the last), none at the side; 24×17: one column at the right. The picture is not shifted."
    ramp = (np.arange(17) * 15).astype(np.uint8)                                                  # 0 … 240 along the odd side
    img = np.broadcast_to(ramp[:, None, None], (17, 24, 3)) if h == 17 else np.broadcast_to(ramp[None, :, None], (24, 17, 3))
    frames = np.stack([img] * 2)
    back, info = read_video(write_video(tmp_path / 'odd.mp4', frames, 10, crf=0, progress=False), progress=False)
    assert (info.height, info.width) == (h + h % 2, w + w % 2)
    assert np.abs(back[:, :h, :w].astype(int) - frames).max() <= 3                                 # in place, not a row/column off
    pad = back[:, h:] if h % 2 else back[:, :, w:]
    assert np.abs(pad.astype(int) - 240).max() <= 3                                             # the edge repeated


def test_frames_too_tall_for_libx264_are_a_user_error_and_leave_no_file(tmp_path):
    "16386 px tall (libx264's limit is 16384 a side, height as well as width): a one-line UserError, not the encoder's 'Generic error'."
    with pytest.raises(UserError, match='at most 16384 px a side'):
        write_video(tmp_path / 'tall.mp4', np.zeros((1, 16386, 16, 3), np.uint8), 10, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('bad', [np.zeros((2, 16, 16, 4), np.uint8), np.zeros((2, 16, 16, 1), np.uint8)], ids=['rgba', 'one-channel'])
def test_frames_that_are_not_rgb_are_refused_by_name(tmp_path, bad):
    "RGBA or single-channel frames: an error that says what frames must be, and no file."
    with pytest.raises(ValueError, match=r'uint8 \(N, H, W, 3\) RGB'):
        write_video(tmp_path / 'x.mp4', bad, 10, progress=False)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- side by side

def _panels(h=64, w1=64, w2=48):
    o = np.full((2, h, w1, 3), 120, np.uint8)
    e = np.full((2, h, w2, 3), 60, np.uint8)
    return o, e

def test_side_by_side_gap_is_black_and_each_label_stays_in_its_own_panel():
    "`o | 20 black columns | e`; the label 'original' changes pixels of the left panel only, the empty second label none."
    o, e = _panels()
    plain = side_by_side(o, e, labels=None, gap=20)
    assert plain.shape == (2, 64, 64 + 20 + 48, 3)
    assert (plain[:, :, :64] == 120).all() and (plain[:, :, 64:84] == 0).all() and (plain[:, :, 84:] == 60).all()
    one = side_by_side(o, e, labels=('original', ''), gap=20)
    changed = np.nonzero((one != plain).any((0, 1, 3)))[0]                                         # columns the labels touched
    assert len(changed) and changed.max() < 64, changed                                          # all of them in the left panel
    both = side_by_side(o, e, labels=('a', 'b'), gap=20)
    cols = np.nonzero((both != plain).any((0, 1, 3)))[0]
    assert cols.min() < 64 and cols.max() >= 84 and not ((cols >= 64) & (cols < 84)).any(), cols  # one per panel, the gap untouched


def test_write_side_by_side_keeps_the_gap(tmp_path):
    "Written, the side-by-side has the gap too: 64 + 16 + 48 wide, black in the middle."
    o, e = _panels()
    back, info = read_video(write_side_by_side(tmp_path / 's.mp4', o, e, 10, labels=None, gap=16, progress=False), progress=False)
    assert (info.width, info.height) == (128, 64)
    assert back[:, :, 68:76].max() <= 20 and abs(back[:, :, 100:].mean() - 60) < 4                # gap black, edit to the right


def test_side_by_side_of_no_frames_is_a_user_error():
    with pytest.raises(UserError, match='no frames to put side by side'):
        side_by_side(np.zeros((0, 16, 16, 3), np.uint8), np.zeros((0, 16, 16, 3), np.uint8))
