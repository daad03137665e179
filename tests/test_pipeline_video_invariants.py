"""Invariants of video reading/writing and of the edit pipeline that no other test pinned down (mutation review of
video.py and pipeline.py: each test fails on at least one code change that the rest of tests/ let through).
Video: non-square pixels shown at the player's width, the BT.601/BT.709 guess for untagged SD/HD, the output's colour
matrix, range and tags, edge-padded odd sizes, exact NTSC rates, resampling a file as raw frames are resampled.
Pipeline: a file edited at --fps is written at that rate with those frames, the audio kept in both outputs, cache keys
(track: crop size, decode rules, tracker; inversion: steps kept, inversion steps, source prompt), unreadable cache
files recomputed, the input never overwritten, $IPFACEDIFF_CACHE, edit_video's out=; camera PCM sound copied. Tiny random
models, one core."""
import os, warnings
os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
from fractions import Fraction
from pathlib import Path
import av, numpy as np, pytest, torch

from shared import one_line_error, top_boxes
from ipfacediff.utils import UserError, data_path
from ipfacediff.video import read_video, resample_indices, write_video

torch.set_num_threads(1)
SAMPLE = data_path('sample.mp4')


# ---------------------------------------------------------------- helpers

def _ramp(n, h=32, w=48):
    "Frame i is a flat grey of level 8*i: its number can be read back from the pixels."
    return np.broadcast_to((np.arange(n) * 8 % 256).astype(np.uint8)[:, None, None, None], (n, h, w, 3)).copy()

def _ids(frames): return np.round(frames.reshape(len(frames), -1).mean(1) / 8).astype(int).tolist()

def _encode(path, frames, rate=10, sar=None, matrix=None):
    """H.264 written with PyAV directly (bypassing write_video); `sar`: the sample aspect ratio; `matrix`: 'ITU601'/'ITU709'
    the pixels are converted with, the frames then left untagged (unspecified matrix and range, as many encoders write)."""
    with av.open(str(path), 'w') as c:
        s = c.add_stream('libx264', rate=rate, options={'crf': '0', 'bframes': '0'})
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], 'yuv420p'
        if sar is not None: s.codec_context.sample_aspect_ratio = sar
        for f in frames:
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format='rgb24')
            if matrix is not None:
                vf = vf.reformat(format='yuv420p', src_colorspace=matrix, dst_colorspace=matrix)
                vf.colorspace, vf.color_range = 2, 0
            for p in s.encode(vf): c.mux(p)
        for p in s.encode(): c.mux(p)
    return path

COLS = np.array([(200, 40, 40), (40, 200, 40), (40, 40, 200), (220, 170, 130)], np.uint8)

def _chart(h, w):
    "Four vertical bars of saturated colours (and a skin tone): BT.601 and BT.709 decode them several levels apart."
    return np.repeat(np.repeat(COLS[None], h, 0), w // 4, 1)


# ---------------------------------------------------------------- reading

def test_non_square_pixels_are_shown_at_the_players_width(tmp_path):
    "A 48x32 clip stored with 4:3 pixels (anamorphic) plays 64x32: read at that width, the picture stretched, not cut."
    stored = np.zeros((2, 32, 48, 3), np.uint8); stored[:, :, 24:] = 255       # left half black, right half white
    with av.open(str(_encode(tmp_path / 'ana.mp4', stored, sar=Fraction(4, 3)))) as c:
        assert c.streams.video[0].sample_aspect_ratio == Fraction(4, 3)     # the clip is what we meant
    frames, info = read_video(tmp_path / 'ana.mp4', progress=False)
    assert frames.shape == (2, 32, 64, 3) and (info.width, info.height) == (64, 32)
    assert frames[:, :, :28].max() < 20 and frames[:, :, 36:].min() > 235     # the edge moved to the middle of 64


@pytest.mark.parametrize('h,w,matrix', [(576, 720, 'ITU601'), (720, 960, 'ITU709')], ids=['PAL-SD-601', '4:3-HD-709'])
def test_untagged_clips_are_decoded_with_the_matrix_players_assume(tmp_path, h, w, matrix):
    "Untagged 720x576 (PAL SD, the largest SD size) is BT.601; untagged 960x720 (4:3 HD: above 576 lines) is BT.709."
    p = _encode(tmp_path / 'untagged.mp4', _chart(h, w)[None], matrix=matrix)
    got = read_video(p, progress=False)[0][0, h // 2, [w // 8 + w // 4 * i for i in range(4)]]
    assert np.abs(got.astype(int) - COLS).max() <= 3, got


def test_a_file_read_at_another_fps_gets_the_frames_raw_frames_get(tmp_path):
    "Reading a 10 fps clip at 4 fps picks the frames `resample_indices` picks (the raw-frame edit path): ties go to the earlier."
    p = _encode(tmp_path / 'ramp.mp4', _ramp(10))
    for fps in (4, 3, 7.5, 25):                                               # 25: each frame held for its whole 0.1 s
        frames, info = read_video(p, fps=fps, progress=False)
        assert _ids(frames) == resample_indices(10, 10, fps).tolist(), fps
    assert resample_indices(10, 10, 4).tolist() == [0, 2, 5, 7]                # 0.25 s lies between frames 2 and 3: frame 2


def test_a_stream_without_duration_longer_than_the_first_guess_is_read_whole(tmp_path):
    "A raw H.264 stream states no duration or frame count: read_video reserves 64 frames at first, grows past them, and keeps max_gb."
    with av.open(str(tmp_path / 'raw.h264'), 'w', format='h264') as c:
        s = c.add_stream('libx264', rate=25); s.width, s.height, s.pix_fmt = 16, 16, 'yuv420p'
        for f in _ramp(70, 16, 16):
            for p in s.encode(av.VideoFrame.from_ndarray(f, format='rgb24')): c.mux(p)
        for p in s.encode(): c.mux(p)
    with av.open(str(tmp_path / 'raw.h264')) as c: assert c.duration is None and not c.streams.video[0].frames
    frames, info = read_video(tmp_path / 'raw.h264', progress=False)
    assert frames.shape == (70, 16, 16, 3) and info.n_frames == 70 and _ids(frames) == [i % 32 for i in range(70)]
    # no size to check before decoding: the memory limit is kept frame by frame (here 10 frames' worth)
    one_line_error(lambda: read_video(tmp_path / 'raw.h264', max_gb=10.5 * 16 * 16 * 3 / 2**30, progress=False), '11 frames of 16x16', 'max_frames')


def test_a_file_cut_between_two_frames_is_refused_not_read_short(tmp_path):
    "An mp4 cut cleanly after its 30th of 40 frames (an interrupted copy) decodes without an error: the header's count exposes it."
    good = write_video(tmp_path / 'good.mp4', _ramp(40), 10, progress=False)
    with av.open(str(good)) as c: ends = [p.pos + p.size for p in c.demux(video=0) if p.size]
    assert len(ends) == 40 and read_video(good, progress=False)[0].shape[0] == 40
    (tmp_path / 'cut.mp4').write_bytes(good.read_bytes()[:ends[29]])
    one_line_error(lambda: read_video(tmp_path / 'cut.mp4', progress=False), 'announces 40 frames but only 30', 're-download')


# ---------------------------------------------------------------- writing

def test_output_is_bt709_limited_range_and_tagged_so(tmp_path):
    "The pixels are converted by the BT.709 matrix into 16-235 luma, and the stream says so (matrix, primaries, transfer, range)."
    chart = np.concatenate([_chart(16, 128), np.zeros((16, 128, 3), np.uint8), np.full((16, 128, 3), 255, np.uint8)])
    p = write_video(tmp_path / 'chart.mp4', np.stack([chart] * 2), 10, progress=False)
    with av.open(str(p)) as c:
        cc = c.streams.video[0].codec_context
        assert (cc.colorspace, cc.color_primaries, cc.color_trc, cc.color_range) == (1, 1, 1, 1)   # BT.709 ×3, MPEG range
        y = next(c.decode(video=0)).reformat(format='yuv444p').to_ndarray()[0]
    want = 16 + 219 / 255 * COLS.astype(float) @ [0.2126, 0.7152, 0.0722]          # BT.709 luma, limited range
    assert np.abs(y[8, 16::32] - want).max() <= 1.5, (y[8, 16::32], want)          # BT.601 would give 91, 138, 35, 175
    assert abs(int(y[24, 64]) - 16) <= 1 and abs(int(y[40, 64]) - 235) <= 1       # black and white at 16 and 235


def test_odd_sizes_are_padded_with_the_edge_not_black(tmp_path):
    "A 101x99 frame is encoded as 102x100 (H.264 4:2:0 needs even sizes): the added row and column repeat the edge."
    frames = np.full((2, 101, 99, 3), 200, np.uint8)
    back, _ = read_video(write_video(tmp_path / 'odd.mp4', frames, 10, progress=False), progress=False)
    assert back.shape == (2, 102, 100, 3)
    assert back[:, -1].min() > 190 and back[:, :, -1].min() > 190, (back[:, -1].min(), back[:, :, -1].min())


@pytest.mark.parametrize('fps,rate', [(24000 / 1001, Fraction(24000, 1001)), (30000 / 1001, Fraction(30000, 1001)), (25.0, Fraction(25))])
def test_ntsc_rates_are_written_exactly(tmp_path, fps, rate):
    "A float 29.97… fps is written as exactly 30000/1001 (what the source had), not a nearby fraction such as 19001/634."
    p = write_video(tmp_path / 'r.mp4', _ramp(3), fps, progress=False)
    with av.open(str(p)) as c: assert c.streams.video[0].average_rate == rate


def test_mp4_output_has_its_index_first(tmp_path):
    "The index (moov) comes before the media data (mdat): a browser or player starts a half-downloaded edit at once."
    boxes = top_boxes(write_video(tmp_path / 'web.mp4', _ramp(3), 10, progress=False))
    assert 'moov' in boxes and 'mdat' in boxes and boxes.index('moov') < boxes.index('mdat'), boxes


def test_side_by_side_scales_the_edited_frames_to_the_original_height():
    "An edit at half the resolution is shown beside the original at the original's height (its width scaled alike)."
    from ipfacediff.video import side_by_side
    o, e = _ramp(2, 32, 48), np.full((2, 16, 24, 3), 255, np.uint8)
    sbs = side_by_side(o, e, labels=None)
    assert sbs.shape == (2, 32, 96, 3)
    assert np.array_equal(sbs[:, :, :48], o) and (sbs[:, :, 48:] == 255).all()


# ---------------------------------------------------------------- the edit pipeline

FEW = dict(size=64, steps=1, inversion_steps=1, batch_size=4)


@pytest.fixture(scope='module')
def tc():
    from ipfacediff.models import tiny_components
    return tiny_components(0)


@pytest.fixture
def pipe(tc, tmp_path):
    "A tiny-model pipeline with its own, empty cache."
    from ipfacediff.pipeline import IPFaceDiffPipeline
    return IPFaceDiffPipeline(tc, cache_dir=tmp_path / 'cache', progress=False, smoke=True)


@pytest.fixture(scope='module')
def clip():
    "The sample's first two frames, raw, and its fps."
    frames, info = read_video(SAMPLE, max_frames=2, progress=False)
    return frames, info.fps


def _audio_seconds(path):
    with av.open(str(path)) as c:
        if not c.streams.audio: return None
        a = c.streams.audio[0]
        return float(a.duration * a.time_base)


def test_a_file_edited_at_another_fps_is_written_at_that_fps_with_its_audio(pipe, tmp_path):
    "`edit --fps 5` of the 10 fps sample: the frames of 0, 0.2, 0.4 s, written at 5 fps, the sound kept in both outputs for 0.6 s."
    from ipfacediff.faces import paste_back
    from ipfacediff.pipeline import EditConfig
    cfg = EditConfig('add glasses', **FEW, fps=5, max_frames=3)
    r = pipe.edit(SAMPLE, cfg, out=tmp_path / 'o.mp4', side_by_side=tmp_path / 's.mp4')
    want = read_video(SAMPLE, fps=5, max_frames=3, progress=False)[0]
    same_count = read_video(SAMPLE, max_frames=3, progress=False)[0]             # frames 0, 1, 2: what ignoring fps gives
    _, masks = paste_back(want, r.crops, r.track, region=cfg.mask, return_masks=True, progress=False, warn=False)
    away = masks == 0                                                          # pixels the paste-back leaves alone
    assert r.fps == 5 and r.frames.shape == want.shape and np.array_equal(r.frames[away], want[away])
    assert not np.array_equal(same_count[away], want[away])                     # (those pixels do tell the frames apart)
    for p, width in ((tmp_path / 'o.mp4', 640), (tmp_path / 's.mp4', 1280)):
        back, info = read_video(p, progress=False)
        assert (info.fps, info.n_frames, info.width) == (5, 3, width) and info.has_audio, (p, info)
        assert abs(_audio_seconds(p) - 0.6) < 0.05, (p, _audio_seconds(p))


def test_face_track_cache_key_holds_the_crop_size_decode_rules_and_tracker(pipe, monkeypatch):
    "A cached track is served only for the same crop size, the same read_video decoding rules and the same tracker."
    import ipfacediff.pipeline as P
    from ipfacediff.pipeline import EditConfig
    frames = read_video(SAMPLE, max_frames=2, progress=False)[0]
    track = lambda size: pipe.face_track(frames, EditConfig('x', size=size, max_frames=2), source=SAMPLE)
    assert not track(64)[1] and track(64)[1]                                   # the cache works at all
    t128, hit = track(128)
    assert not hit and t128.size == 128                                        # not the 64 px crops' track
    monkeypatch.setattr(P, 'DECODE_RULES', P.DECODE_RULES + 1)                  # read_video now gives other pixels
    assert not track(64)[1]
    monkeypatch.setattr(P, 'tracker_id', lambda: 'another dlib')               # another dlib or landmark model
    assert not track(64)[1]
    assert len(list((pipe.cache_dir / 'tracks').glob('*.npz'))) == 4


def test_face_tracks_of_different_lengths_are_two_cache_entries(pipe):
    "The first 2 and the first 3 frames of a file are cached apart: no warning, no recomputation when switching back."
    from ipfacediff.pipeline import EditConfig
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        for n, hit in ((2, False), (3, False), (2, True)):
            frames = read_video(SAMPLE, max_frames=n, progress=False)[0]
            t, h = pipe.face_track(frames, EditConfig('x', size=64, max_frames=n), source=SAMPLE)
            assert h == hit and len(t) == n, (n, h)


def test_unreadable_face_track_cache_file_is_recomputed(pipe):
    "A cache file left damaged (a full disk, a crash) is ignored with a warning and replaced, not an error."
    from ipfacediff.pipeline import EditConfig
    frames, cfg = read_video(SAMPLE, max_frames=2, progress=False)[0], EditConfig('x', size=64, max_frames=2)
    first, _ = pipe.face_track(frames, cfg, source=SAMPLE)
    (f,) = (pipe.cache_dir / 'tracks').glob('*.npz')
    f.write_bytes(b'PK\x03\x04 half a file')
    with pytest.warns(UserWarning, match='ignoring a face-track cache file'): again, hit = pipe.face_track(frames, cfg, source=SAMPLE)
    assert not hit and np.array_equal(again.landmarks, first.landmarks)
    assert pipe.face_track(frames, cfg, source=SAMPLE)[1]                       # rewritten


def test_inversion_cache_key_holds_the_kept_steps_inversion_steps_and_source_prompt(pipe, clip):
    "An inversion is reused only for the same editing steps, inversion steps and source prompt (each changes what is kept)."
    from ipfacediff.pipeline import EditConfig
    frames, fps = clip
    edit = lambda **k: pipe.edit(frames, EditConfig('add glasses', size=64, batch_size=4, **k), fps=fps)
    r = edit(steps=1, inversion_steps=2)
    assert not r.cache_hit and r.unet_calls['inversion'] == 2 * 2
    assert edit(steps=1, inversion_steps=2).cache_hit                          # the cache works at all
    assert not edit(steps=2, inversion_steps=2).cache_hit                      # the 1-step entry lacks t=501 (was a UserError)
    assert not edit(steps=1, inversion_steps=1).cache_hit                      # a coarser inversion: another z_T
    assert not edit(steps=1, inversion_steps=2, source_prompt='a photo of a man').cache_hit
    assert len(list((pipe.cache_dir / 'inversion').glob('*.pt'))) == 4


def test_unreadable_inversion_cache_file_is_recomputed(pipe, clip):
    "A damaged inversion cache file is ignored with a warning and written anew; the edit is the same as without it."
    from ipfacediff.pipeline import EditConfig
    frames, fps = clip
    edit = lambda: pipe.edit(frames, EditConfig('add glasses', **FEW), fps=fps)
    first = edit()
    (f,) = (pipe.cache_dir / 'inversion').glob('*.pt')
    f.write_bytes(b'not a torch file')
    with pytest.warns(UserWarning, match='ignoring an unreadable inversion cache file'): again = edit()
    assert not again.cache_hit and np.array_equal(again.frames, first.frames)
    assert edit().cache_hit


def test_edit_never_writes_over_its_input(pipe, tmp_path, monkeypatch):
    "out= or side_by_side= naming the input video (here by a relative path) is refused even with overwrite=True, before any work."
    import shutil
    from ipfacediff.pipeline import EditConfig
    src = Path(shutil.copy(SAMPLE, tmp_path / 'clip.mp4'))
    before = src.read_bytes()
    monkeypatch.chdir(tmp_path)
    for kw in (dict(out='clip.mp4'), dict(out='o.mp4', side_by_side='./clip.mp4')):
        one_line_error(lambda: pipe.edit(src, EditConfig('x', **FEW, max_frames=2), overwrite=True, **kw), 'is the input video')
    assert src.read_bytes() == before and sum(pipe.calls.values()) == 0 and not (tmp_path / 'o.mp4').exists()


def test_default_cache_dir_is_ipfacediff_cache(tc, tmp_path, monkeypatch):
    "$IPFACEDIFF_CACHE chooses where tracks and inversions go (a shared or bigger disk); unset, ~/.cache/ipfacediff."
    from ipfacediff.pipeline import IPFaceDiffPipeline, default_cache_dir
    monkeypatch.setenv('IPFACEDIFF_CACHE', str(tmp_path / 'big'))
    assert default_cache_dir() == tmp_path / 'big' and IPFaceDiffPipeline(tc).cache_dir == tmp_path / 'big'
    monkeypatch.delenv('IPFACEDIFF_CACHE')
    assert default_cache_dir() == Path.home() / '.cache' / 'ipfacediff'


def test_edit_video_writes_out(pipe, tmp_path):
    "The one-call API writes the edited video to out= (and says so in the result)."
    from ipfacediff.pipeline import edit_video
    r = edit_video(SAMPLE, 'add glasses', out=tmp_path / 'o.mp4', pipeline=pipe, **FEW, max_frames=2)
    back, info = read_video(tmp_path / 'o.mp4', progress=False)
    assert r.out == tmp_path / 'o.mp4' and back.shape == r.frames.shape and info.fps == 10 and info.has_audio


# ---------------------------------------------------------------- the edit command's settings and outputs

def _edit_settings(*args):
    from ipfacediff.cli import build_parser
    from ipfacediff.pipeline import _settings_from_args
    return _settings_from_args(build_parser(['edit']).parse_args(['edit', 'in.mp4', '--prompt', 'x', '--out', 'o.mp4', *args]))


def test_edit_command_inverts_with_the_editing_steps_by_default():
    "Without --inversion-steps the inversion runs --steps steps (not EditConfig's 50): --steps 10 costs 10 inversion steps."
    assert _edit_settings('--steps', '10')['inversion_steps'] == 10
    assert _edit_settings()['inversion_steps'] == _edit_settings()['steps'] == 50
    s = _edit_settings('--tiny')
    assert (s['steps'], s['inversion_steps'], s['size']) == (10, 10, 128)
    assert _edit_settings('--steps', '10', '--inversion-steps', '100')['inversion_steps'] == 100


def test_edit_command_keyframe_window_0_means_all_keyframes():
    "--keyframe-window 0 puts every keyframe in one group (None in Python), as its help says, instead of being refused."
    from ipfacediff.pipeline import EditConfig
    s = _edit_settings('--keyframe-window', '0')
    assert s['keyframe_window'] is None and EditConfig('x', **s).validate().keyframe_window is None
    assert _edit_settings()['keyframe_window'] == 8


def test_output_names_in_capitals_are_videos(tmp_path):
    "A camera's habit, EDIT.MP4 or CLIP.MOV, names a video as well as edit.mp4 does; a .gif is refused."
    from ipfacediff.pipeline import check_outputs
    check_outputs(tmp_path / 'EDIT.MP4', tmp_path / 'SBS.MOV')
    one_line_error(lambda: check_outputs(tmp_path / 'edit.gif'), '--out', 'should be a video file name ending in .mp4')


# ---------------------------------------------------------------- a bug this review found (fixed)

def test_pcm_audio_without_a_channel_order_is_copied(tmp_path):
    """A camera/webcam AVI (MJPEG + 16-bit PCM stereo, a layout with no channel order) keeps its sound in the edited mp4 —
    the AAC encoder refused '2 channels', so `ipfacediff edit cam.avi` failed at the very end."""
    with av.open(str(tmp_path / 'cam.avi'), 'w') as c:
        s = c.add_stream('mjpeg', rate=10); s.width, s.height, s.pix_fmt = 48, 32, 'yuvj420p'
        a = c.add_stream('pcm_s16le', rate=48000, layout='stereo')
        for f in _ramp(5):
            for p in s.encode(av.VideoFrame.from_ndarray(f, format='rgb24')): c.mux(p)
        for p in s.encode(): c.mux(p)
        for i in range(0, 24000, 1200):
            af = av.AudioFrame.from_ndarray(np.zeros((1, 2400), np.int16), format='s16', layout='stereo')
            af.sample_rate, af.pts = 48000, i
            for p in a.encode(af): c.mux(p)
        for p in a.encode(): c.mux(p)
    with av.open(str(tmp_path / 'cam.avi')) as c: assert c.streams.audio[0].codec_context.layout.name == '2 channels'   # no order
    frames, info = read_video(tmp_path / 'cam.avi', progress=False)
    out = write_video(tmp_path / 'o.mp4', frames, info.fps, audio_from=tmp_path / 'cam.avi', progress=False)
    assert read_video(out, progress=False)[1].has_audio and abs(_audio_seconds(out) - 0.5) < 0.05
