"""Bad input and round trips for ipfacediff.video and ipfacediff.faces (real sample clip, real dlib models)."""
import os, types, warnings
os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
from fractions import Fraction
from pathlib import Path
import av, cv2, numpy as np, pytest, skimage.data
from ipfacediff.utils import UserError, data_path
from ipfacediff.video import (read_video, write_video, write_side_by_side, display_rotation, upright,
                              _rotation_matrix, _stream_rotation)
from ipfacediff.faces import track_faces, align_faces, paste_back, detect_faces


@pytest.fixture(scope='module')
def sample():
    frames, info = read_video(data_path('sample.mp4'), progress=False)
    return frames, info


def _encode(path, frames, fps=10, rotation=None):
    "Write frames with PyAV directly (optionally with a display matrix), bypassing write_video."
    with av.open(str(path), 'w') as c:
        s = c.add_stream('libx264', rate=Fraction(fps).limit_denominator(1001), options={'crf': '12'})
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], 'yuv420p'
        if rotation is not None: s.set_display_rotation(rotation)
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format='rgb24')): c.mux(p)
        for p in s.encode(): c.mux(p)


# ---------------------------------------------------------------- bad input to read_video

def test_missing_file(tmp_path):
    with pytest.raises(UserError, match='no such file'): read_video(tmp_path / 'nope.mp4', progress=False)


def test_not_a_video(tmp_path):
    p = tmp_path / 'notes.mp4'; p.write_text('definitely not a video\n' * 100)
    with pytest.raises(UserError, match='cannot read .* as a video'): read_video(p, progress=False)
    (tmp_path / 'empty.mp4').write_bytes(b'')
    with pytest.raises(UserError, match='empty'): read_video(tmp_path / 'empty.mp4', progress=False)
    with pytest.raises(UserError, match='is a folder'): read_video(tmp_path, progress=False)


@pytest.mark.parametrize('ext', ['mp4', 'mkv'])
def test_zero_frames(tmp_path, ext):
    p = tmp_path / f'zero.{ext}'
    with av.open(str(p), 'w') as c:
        s = c.add_stream('libx264', rate=10); s.width, s.height, s.pix_fmt = 64, 48, 'yuv420p'
        c.start_encoding()
    assert p.stat().st_size > 0
    with pytest.raises(UserError, match='has no video frames'): read_video(p, progress=False)


def test_truncated(tmp_path, sample):
    frames, _ = sample
    good = write_video(tmp_path / 'good.mp4', frames, 10, progress=False)   # index first (+faststart)
    data = good.read_bytes()
    (tmp_path / 'cut.mp4').write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match='truncated'): read_video(tmp_path / 'cut.mp4', progress=False)
    _encode(tmp_path / 'tail.mp4', frames[:10])                              # index at the end
    data = (tmp_path / 'tail.mp4').read_bytes()
    (tmp_path / 'tail_cut.mp4').write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match='damaged'): read_video(tmp_path / 'tail_cut.mp4', progress=False)
    with pytest.raises(UserError, match='would need'): read_video(good, max_gb=0.001, progress=False)


def test_no_face(tmp_path):
    coffee = skimage.data.coffee()[:400, :600]
    noise = np.random.default_rng(0).integers(0, 256, (3, 400, 600, 3), dtype=np.uint8)
    _encode(tmp_path / 'coffee.mp4', np.concatenate([np.stack([coffee] * 3), noise]))
    frames, info = read_video(tmp_path / 'coffee.mp4', progress=False)
    assert info.n_frames == 6
    with pytest.raises(UserError, match='no face found in any of the 6 frames'): track_faces(frames, progress=False)


# ---------------------------------------------------------------- rotation

def test_display_matrix_parsing():
    for deg in (0, 90, 180, -90): assert display_rotation(_rotation_matrix(deg)) == deg
    # FFmpeg's matrix for a clockwise quarter turn (an iPhone held upright): 0 1 0 / -1 0 0 / 0 0 1<<30
    assert display_rotation([0, 65536, 0, -65536, 0, 0, 0, 0, 1 << 30]) == -90
    a = np.arange(6).reshape(2, 3, 1)
    assert upright(a, 90).shape == (3, 2, 1) and upright(a, 90)[0, 0, 0] == 2   # counter-clockwise
    # the old `rotate` tag (clockwise degrees) when the frame carries no display matrix
    stream = types.SimpleNamespace(metadata={'rotate': '90'})
    assert _stream_rotation(None, stream, None) == (-90, False)
    assert _stream_rotation(None, types.SimpleNamespace(metadata={'rotate': '180'}), None) == (180, False)
    assert _stream_rotation(None, types.SimpleNamespace(metadata={}), None) == (0, False)


def test_portrait_phone_video(tmp_path, sample):
    frames, _ = sample
    portrait = np.ascontiguousarray(frames[:4, :, 330:610])          # upright: 360 tall, 280 wide
    stored = np.stack([np.rot90(f, 1) for f in portrait])            # as a phone stores it: 280 x 360
    _encode(tmp_path / 'phone.mp4', stored, rotation=-90)            # display: a quarter turn clockwise
    got, info = read_video(tmp_path / 'phone.mp4', progress=False)
    assert info.rotation == -90 and got.shape == (4, 360, 280, 3) and (info.width, info.height) == (280, 360)
    assert np.abs(got.astype(int) - portrait).mean() < 3
    track = track_faces(got, progress=False)                         # HOG only finds upright faces
    assert track.detected.all()
    assert len(detect_faces(stored[0])) == 0                         # ... so the stored frames would fail


# ---------------------------------------------------------------- large frames

def test_large_resolution(tmp_path, sample):
    frames, _ = sample
    small = frames[:3]
    big = np.stack([cv2.resize(f, (3840, 2160), interpolation=cv2.INTER_CUBIC) for f in small])
    write_video(tmp_path / 'uhd.mp4', big, 10, crf=23, preset='ultrafast', progress=False)
    big2, info = read_video(tmp_path / 'uhd.mp4', progress=False)
    assert (info.width, info.height, info.n_frames) == (3840, 2160, 3)
    t_small, t_big = track_faces(small, progress=False), track_faces(big2, progress=False)
    assert t_big.detected.all() and t_big.frame_size == (2160, 3840)
    k = 3840 / 640                                                  # coordinates map back to the frame
    err = np.abs((t_big.landmarks + 0.5) / k - 0.5 - t_small.landmarks).mean()
    assert err < 2.0, err
    c_small, c_big = align_faces(small, t_small, progress=False), align_faces(big2, t_big, progress=False)
    assert np.abs(c_small.astype(int) - c_big).mean() < 10         # same face in the same place


# ---------------------------------------------------------------- writing

@pytest.mark.parametrize('fps', [10, 24000 / 1001])
def test_written_video_keeps_count_size_fps(tmp_path, sample, fps):
    frames, _ = sample
    out = write_video(tmp_path / 'out.mp4', frames[:12], fps, audio_from=data_path('sample.mp4'), progress=False)
    back, info = read_video(out, progress=False)
    assert back.shape == (12, 360, 640, 3)
    assert abs(info.fps - fps) < 1e-3 and info.has_audio
    assert np.abs(back.astype(int) - frames[:12]).mean() < 3
    with av.open(str(out)) as c:
        a = c.streams.audio[0]
        assert abs(float(a.duration * a.time_base) - 12 / fps) < 0.05


def test_write_without_audio_and_odd_size(tmp_path, sample):
    frames, _ = sample
    out = write_video(tmp_path / 'odd.mp4', frames[:3, :101, :99], 10, progress=False)
    back, info = read_video(out, progress=False)
    assert back.shape == (3, 102, 100, 3) and not info.has_audio


def test_atomic_output(tmp_path, sample):
    frames, _ = sample
    out = write_video(tmp_path / 'a.mp4', frames[:3], 10, progress=False)
    before = out.read_bytes()
    with pytest.raises(UserError, match='--overwrite'): write_video(out, frames[:5], 10, progress=False)
    assert out.read_bytes() == before
    write_video(out, frames[:5], 10, overwrite=True, progress=False)
    assert read_video(out, progress=False)[1].n_frames == 5
    listing = sorted(p.name for p in tmp_path.iterdir())

    def failing():                                                 # the edit crashes half-way
        for f in frames[:4]: yield f
        raise RuntimeError('model crashed')
    class Frames(list):
        def __iter__(self): return failing()
    with pytest.raises(RuntimeError, match='crashed'): write_video(tmp_path / 'b.mp4', Frames(frames[:8]), 10, progress=False)
    with pytest.raises(ValueError, match='frame 2'):
        write_video(tmp_path / 'c.mp4', [frames[0], frames[1], frames[2, :10]], 10, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == listing    # no partial files left
    with pytest.raises(UserError, match='does not exist'): write_video(tmp_path / 'no' / 'x.mp4', frames[:2], 10, progress=False)


def test_side_by_side(tmp_path, sample):
    frames, _ = sample
    out = write_side_by_side(tmp_path / 'sbs.mp4', frames[:4], 255 - frames[:4], 10, progress=False)
    back, info = read_video(out, progress=False)
    assert back.shape == (4, 360, 1280, 3)
    assert back[:, 100:, 640:].mean() > 255 - back[:, 100:, :640].mean() - 5    # right half is the inverted one
    with pytest.raises(UserError, match='equal length'): write_side_by_side(tmp_path / 'x.mp4', frames[:3], frames[:2], 10)


# ---------------------------------------------------------------- paste-back

def test_paste_back_only_touches_the_face(sample):
    frames, _ = sample
    f = frames[::8]
    track = track_faces(f, progress=False)
    crops = align_faces(f, track, progress=False)
    edited, masks = paste_back(f, 255 - crops, track, return_masks=True, progress=False)
    outside, core = masks == 0, masks > 0.99
    assert outside.mean() > 0.3 and core.mean() > 0.05
    assert np.array_equal(edited[outside], f[outside])
    assert np.abs(edited[core].astype(int) - f[core]).mean() > 50
    rt = paste_back(f, crops, track, progress=False)
    assert np.abs(rt[core].astype(int) - f[core]).mean() < 1.0
    with pytest.raises(UserError, match='as many crops'): paste_back(f, crops[:2], track, progress=False)
