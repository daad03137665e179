"""Invariants of the reading side of `ipfacediff.video` that no other test pinned down (mutation review of `_check_start`,
`check_max_frames`, `display_rotation`, `upright`, `_square_width`, `_plan`, `_decode`, `read_video`, `video_bytes` and
`VideoFrames`/`_FrameSpan`: each test fails on at least one code change that the notebook's checks and the rest of
tests/ let through; its docstring names them). What they pin: `start=True` is refused as `max_frames=True` is; a rotated
clip's frames from `VideoFrames` are C-contiguous arrays (as `read_video`'s are), so OpenCV can draw on them and torch
can take them; a non-square-pixel clip is scaled to an *even* width; `max_gb` refuses only *more* than it, exactly that
many bytes reads; the header estimate (`video_bytes`, the `max_gb` check) counts frames from `start` on; a file with
keyframes read from `start` is not taken for a truncated one; `VideoFrames[i]` asked for the frame it last returned does
not decode again; slices that run backwards are empty (of a span too), and steps are refused; a span's pass converts no
frame before it; a whole float `max_frames` (4.0) reads that many frames; an all-zero display matrix is no rotation.
Tiny lossless clips made with PyAV whose frame `i` is grey level 8·i, so each frame read says which source frame it is;
offline, one core."""
import os
os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
from fractions import Fraction
import av, cv2, numpy as np, pytest

from shared import one_line_error
from ipfacediff import video as V
from ipfacediff.video import VideoFrames, read_video, video_bytes, write_video


# ---------------------------------------------------------------- helpers

def _ramp(path, n=30, fps=10, w=48, h=32, gop=None, sar=None, rotation=None):
    "`n` lossless frames at `fps`, frame i a flat grey 8·i; `gop`: a keyframe every `gop` frames; `sar`: pixel aspect; `rotation`: display matrix."
    with av.open(str(path), 'w') as c:
        s = c.add_stream('libx264', rate=fps, options={'crf': '0', **({'g': str(gop), 'keyint_min': str(gop)} if gop else {})})
        s.width, s.height, s.pix_fmt = w, h, 'yuv420p'
        if sar: s.codec_context.sample_aspect_ratio = sar
        if rotation is not None: s.set_display_rotation(rotation)
        for i in range(n):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((h, w, 3), 8 * i, np.uint8), format='rgb24')): c.mux(p)
        for p in s.encode(): c.mux(p)
    return path


def _ids(frames): return [int(round(float(np.mean(f)) / 8)) for f in frames]


@pytest.fixture(scope='module')
def ramp(tmp_path_factory):
    "30 frames at 10 fps, 48×32, one keyframe."
    return _ramp(tmp_path_factory.mktemp('ramp') / 'ramp.mp4')


# ---------------------------------------------------------------- arguments

def test_start_true_is_refused_like_max_frames_true(ramp):
    """Kills `_check_start` taking a bool for a number (the `isinstance(start, bool)` test dropped): `start=True` read from
    1 s on, where `max_frames=True` is refused (the notebook checks that); it is a one-line UserError too."""
    one_line_error(lambda: read_video(ramp, start=True, progress=False), '0 or more', 'True')
    one_line_error(lambda: VideoFrames(ramp, start=True), '0 or more')
    assert read_video(ramp, start=1, max_frames=1, progress=False)[1].start == 1.0     # a plain int is a time


# ---------------------------------------------------------------- the frames' layout and size

def test_rotated_frames_from_video_frames_are_contiguous(tmp_path):
    """Kills `upright` returning `np.rot90`'s view (no `ascontiguousarray`): `read_video` copies it into its buffer, but
    `VideoFrames` handed out a negative-stride view for a rotated, unmirrored clip, on which `cv2.rectangle` raises and
    `torch.from_numpy` refuses."""
    p = _ramp(tmp_path / 'rot.mp4', n=3, rotation=90)
    held, info = read_video(p, progress=False)
    assert info.rotation == 90 and held.shape == (3, 48, 32, 3)
    for f in (VideoFrames(p)[1], next(iter(VideoFrames(p)))):
        assert f.flags.c_contiguous and f.shape == (48, 32, 3)
        cv2.rectangle(f, (0, 0), (3, 3), (255, 0, 0), -1)          # drawing in place, as the overlays do
        assert (f[0, 0] == (255, 0, 0)).all()
    import torch
    assert torch.from_numpy(VideoFrames(p)[2]).shape == (48, 32, 3)


def test_non_square_pixels_are_scaled_to_an_even_width(tmp_path):
    """Kills `_square_width` rounding to the nearest width (`round(width * sar)`): 38 px at 5:3 pixels is 63.3 px wide as
    shown, read as 64 (even, as its docstring says and H.264 needs to write it back), not 63; `video_bytes` agrees."""
    p = _ramp(tmp_path / 'sar.mp4', n=3, w=38, sar=Fraction(5, 3))
    fr, info = read_video(p, progress=False)
    assert fr.shape == (3, 32, 64, 3) and (info.width, info.height) == (64, 32)
    assert video_bytes(p) == fr.nbytes


def test_max_gb_refuses_more_than_it_not_exactly_it(ramp):
    """Kills the header estimate's check refusing at the limit (`>=`, not `>`): frames of exactly `max_gb` GiB are read
    (`read_video` says "more than `max_gb` are refused"), one byte less refuses them."""
    n = 30 * 32 * 48 * 3
    assert read_video(ramp, progress=False, max_gb=n / 2**30)[0].nbytes == n
    one_line_error(lambda: read_video(ramp, progress=False, max_gb=(n - 1) / 2**30), 'would need', 'max_frames')


def test_the_estimate_counts_frames_from_start_on(ramp):
    """Kills `_plan` estimating from the file's whole duration, ignoring `start`: `video_bytes(start=1)` said 30 frames' bytes
    for the 20 `read_video` returns (so the automatic `--stream` choice and `too_big_to_hold` over-counted), and a read from 1 s
    with `max_gb` just above the 20 frames was refused."""
    n20 = 20 * 32 * 48 * 3
    assert video_bytes(ramp, start=1.0) == n20 == video_bytes(ramp, fps=10, start=1.0)
    fr, info = read_video(ramp, start=1.0, progress=False, max_gb=n20 / 2**30)
    assert fr.nbytes == n20 and _ids(fr) == list(range(10, 30)) and info.start == 1.0
    assert not V.too_big_to_hold(ramp, start=1.0) and video_bytes(ramp, start=2.0) == 10 * 32 * 48 * 3


# ---------------------------------------------------------------- reading from `start`

def test_a_file_with_keyframes_read_from_start_is_not_called_truncated(tmp_path):
    """Kills the truncation check applied after a seek (`start == 0` dropped): a file with a keyframe every 5 frames read from
    2 s decodes only its last 10 frames of the 30 its header announces, which is not a truncated file."""
    p = _ramp(tmp_path / 'gop.mp4', gop=5)
    fr, info = read_video(p, start=2.0, progress=False)
    assert _ids(fr) == list(range(20, 30)) and info.start == 2.0 and info.n_frames == 10
    assert _ids(list(VideoFrames(p, start=2.0))) == list(range(20, 30))


# ---------------------------------------------------------------- VideoFrames

def test_asking_for_the_same_frame_again_does_not_decode_again(ramp, monkeypatch):
    """Kills `VideoFrames.__getitem__` starting a new pass for the frame it last returned (`i <= self._pos`): its docstring
    re-decodes only for an *earlier* frame; `vf[5]` twice (a face crop then its paste-back) took a second whole pass. Counted
    on the real `_decode`: one counting pass and one pass over the frames."""
    calls, real = [], V._decode
    monkeypatch.setattr(V, '_decode', lambda *a, **k: calls.append(1) or real(*a, **k))
    vf = VideoFrames(ramp, fps=4)
    a, b, c = vf[5], vf[5], vf[6]
    assert _ids([a, b, c]) == [12, 12, 15] and a is b
    assert len(calls) == 2
    assert _ids([vf[5]]) == [12] and len(calls) == 3                 # one back: a new pass, as documented


def test_backward_slices_are_empty_and_steps_are_refused(ramp):
    """Kills `VideoFrames[lo:hi]` keeping `hi` below `lo` (`max(lo, hi)` dropped): a backward slice is empty, as a list's
    or an array's is, not a span of negative length that `len` raises on (a span's own backward slice is empty through it);
    and kills the step check dropped: `vf[::2]` is a ValueError, not every frame."""
    vf = VideoFrames(ramp, fps=4)
    for s in (vf[7:3], vf[-2:2], vf[3:7][3:1], vf[3:7][-1:0]):
        assert len(s) == 0 and list(s) == []
    span = vf[3:7]
    assert _ids(list(span[1:-1])) == [10, 12] and _ids(list(vf[10:3:1])) == []
    for bad in (lambda: vf[::2], lambda: vf[1:9:3], lambda: vf[::-1]):
        with pytest.raises(ValueError, match='every frame'): bad()



def test_a_span_converts_only_its_own_frames(ramp, monkeypatch):
    """Kills `_FrameSpan.__iter__` iterating a plain pass (`skip=self.lo` dropped): the frames are right, but each frame
    before the span was converted to RGB and thrown away (a span of the last 2 of 30 frames converted 22). Counted on the
    real `upright`, which every converted frame goes through: frame 0 (for the size) and the span's own."""
    vf = VideoFrames(ramp)
    assert len(vf) == 30
    calls, real = [], V.upright
    monkeypatch.setattr(V, 'upright', lambda *a, **k: calls.append(1) or real(*a, **k))
    assert _ids(list(vf[20:22])) == [20, 21]
    assert len(calls) == 3


def test_whole_float_max_frames_reads_that_many_frames(ramp):
    """Kills `check_max_frames` returning `n` as given, not `int(n)` (the notebook's `test_eq(check_max_frames(4.0), 4)` holds
    for 4.0 too): `max_frames=4.0` — as a JSON config or a numpy sum gives it — then sized the frame buffer with a float
    and `read_video` raised a TypeError."""
    fr, info = read_video(ramp, max_frames=4.0, progress=False)
    assert _ids(fr) == [0, 1, 2, 3] and info.n_frames == 4 and type(info.n_frames) is int
    assert len(VideoFrames(ramp, max_frames=np.float64(3))) == 3


def test_a_degenerate_display_matrix_is_no_rotation():
    """Kills `display_rotation` without its zero-scale guard: an all-zero (or zero-column) display matrix — what a broken
    muxer writes — is no rotation, not a `ValueError` from a NaN angle."""
    for m in ([0] * 9, [0, 65536, 0, 0, 65536, 0, 0, 0, 1 << 30]):
        assert V.display_rotation(m) == 0 and V.display_orientation(m) == (0, False)


# ---------------------------------------------------------------- what `VideoInfo` and the warnings say

def test_source_fps_is_the_sources_rate_when_resampled(ramp):
    """Kills `VideoInfo.source_fps` set to the output rate: read at 4 fps, the 10 fps ramp's `source_fps` is 10 (its
    `fps` 4), from `read_video` and `VideoFrames.info` alike."""
    for info in (read_video(ramp, fps=4, progress=False)[1], VideoFrames(ramp, fps=4).info):
        assert (info.fps, info.source_fps, info.n_frames) == (4.0, 10.0, 12)


def _tagged(path, primaries, trc):
    "3 grey 48×32 frames tagged with colour `primaries` and transfer `trc` (8-bit, BT.709 matrix)."
    with av.open(str(path), 'w') as c:
        s = c.add_stream('libx264', rate=10); s.width, s.height, s.pix_fmt = 48, 32, 'yuv420p'
        cc = s.codec_context; cc.colorspace, cc.color_primaries, cc.color_trc, cc.color_range = 1, primaries, trc, 1
        for _ in range(3):
            f = V._yuv709(np.full((32, 48, 3), 128, np.uint8)); f.color_primaries, f.color_trc = primaries, trc
            for p in s.encode(f): c.mux(p)
        for p in s.encode(): c.mux(p)
    return path


def test_hdr_warning_is_for_bt2020_primaries_not_bt709(tmp_path, ramp):
    """Kills the HDR check testing primaries 1 (BT.709) instead of 9 (BT.2020): a BT.709 file — what `write_video` writes —
    read with a warning that it is HDR, and a BT.2020 one read without."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        read_video(_tagged(tmp_path / 'sdr.mp4', 1, 1), progress=False)
        read_video(write_video(tmp_path / 'w.mp4', read_video(ramp, max_frames=2, progress=False)[0], 10, progress=False), progress=False)
    with pytest.warns(UserWarning, match='is HDR video'): read_video(_tagged(tmp_path / 'wide.mp4', 9, 1), progress=False)
