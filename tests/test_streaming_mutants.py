"""Streamed edits, the parts the other tests leave loose (each test names the mutation of the library it catches):
`write_edited` against the in-memory paste-back where the face's place is unknown,
`VideoWriter`'s conversion failing for want of memory, MB-tree off in every
file, `video_bytes` against what `read_video` returns, `VideoFrames` one frame back, and
the CLI's out-of-memory words for a versioned shared library."""
import errno
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
import av, cv2, numpy as np, pytest, torch

from ipfacediff import video as V
from ipfacediff.cli import oom_words, out_of_memory
from ipfacediff.faces import align_faces, paste_back, track_faces
from ipfacediff.pipeline import IPFaceDiffPipeline, EditConfig
from ipfacediff.utils import data_path
from ipfacediff.video import read_video, write_video, video_bytes, VideoWriter

from shared import STREAM_SMOKE as SMOKE, stream_pipe  # noqa: F401 (the `pipe` fixture)

@pytest.fixture(scope='module')
def clip(pipe):
    "8 frames of the sample, their face track, and latents of their crops (a little noise added: an 'edit')."
    f = read_video(data_path('sample.mp4'), max_frames=8, progress=False)[0]
    track = track_faces(f, size=64, progress=False)
    z = pipe.encode_crops(align_faces(f, track, progress=False), 3)
    z = z + 0.5 * torch.randn(z.shape, generator=torch.Generator().manual_seed(0)).to(z)
    return f, track, z

def held(pipe, frames, z, track, cfg, path):
    "What `edit` writes when the frames are in memory: decode, paste back, `write_video`."
    full = frames.copy()
    paste_back(frames, pipe.decode_latents(z, cfg.batch_size), track, region=cfg.mask, progress=False, warn=False, out=full)
    return write_video(path, full, 10, progress=False)

def test_write_edited_leaves_frames_where_the_face_is_unknown(pipe, clip, tmp_path):
    """Kills `write_edited` pasting into every frame of the span (`and not skip[j]` dropped): frames 3–4 marked not found,
    and no gap bridged (max_gap 0), are left as they are — as the in-memory paste-back leaves them."""
    f, track, z = clip
    det = np.asarray(track.detected, bool).copy(); det[3:5] = False
    t = replace(track, detected=det, max_gap=0)
    assert list(~t.covered(0)) == [False] * 3 + [True] * 2 + [False] * 3
    cfg = EditConfig('x', **SMOKE).validate()
    held(pipe, f, z, t, cfg, tmp_path / 'm.mp4')
    pipe.write_edited([x.copy() for x in f], z, t, (0, 8), cfg, 10, tmp_path / 's.mp4')
    assert (tmp_path / 's.mp4').read_bytes() == (tmp_path / 'm.mp4').read_bytes()

def test_encoder_out_of_threads_is_memory_error(tmp_path, monkeypatch):
    """Kills `VideoWriter._encode` converting RGB → YUV outside its `try`, or not catching EAGAIN (`BlockingIOError`, what
    swscale raised under `ulimit -v` when it could not start its threads): a `MemoryError` (the CLI's one line), no file left."""
    def yuv(rgb): raise av.error.BlockingIOError(errno.EAGAIN, 'Resource temporarily unavailable')
    monkeypatch.setattr(V, '_yuv709', yuv)
    with pytest.raises(MemoryError, match='memory or threads'):
        write_video(tmp_path / 'x.mp4', np.zeros((2, 16, 16, 3), np.uint8), 10, progress=False)
    assert list(tmp_path.iterdir()) == []

def test_every_file_is_written_without_mbtree(tmp_path):
    """Kills the `mbtree` option removed from `VideoWriter`: with MB-tree on, the same frames 280 px wide were encoded into
    different files from run to run (intermittently, so the run-to-run test may pass by luck). x264 records its settings in the file."""
    fr = read_video(data_path('sample.mp4'), max_frames=3, progress=False)[0][:, :, 330:610]
    data = write_video(tmp_path / 'x.mp4', np.ascontiguousarray(fr), 10, progress=False).read_bytes()
    assert b'mbtree=0' in data and b'mbtree=1' not in data

def test_video_bytes_is_what_read_video_returns(tmp_path):
    """Kills `video_bytes` counting stored (not square) pixels and `_plan` ignoring `max_frames`: the automatic `--stream`
    decision must see the bytes `read_video` would return — anamorphic 480×360 shown 640×360, and cut by max_frames."""
    f = read_video(data_path('sample.mp4'), max_frames=6, progress=False)[0]
    p = tmp_path / 'ana.mp4'
    with av.open(str(p), 'w') as c:
        s = c.add_stream('libx264', rate=10, options={'crf': '0'})
        s.width, s.height, s.pix_fmt = 480, 360, 'yuv420p'
        s.codec_context.sample_aspect_ratio = Fraction(4, 3)
        for x in f:
            for pk in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(cv2.resize(x, (480, 360))), format='rgb24')): c.mux(pk)
        for pk in s.encode(): c.mux(pk)
    assert video_bytes(p) == read_video(p, progress=False)[0].nbytes == 6 * 640 * 360 * 3
    assert video_bytes(data_path('sample.mp4'), max_frames=4) == read_video(data_path('sample.mp4'), max_frames=4, progress=False)[0].nbytes

def test_video_frames_one_frame_back(tmp_path):
    """Kills `VideoFrames.__getitem__` restarting its pass only for a frame two or more before the last one (`i < self._pos - 1`):
    the frame just before the last one asked for is that frame, not the last one again."""
    f = read_video(data_path('sample.mp4'), max_frames=5, progress=False)[0]
    vf = V.VideoFrames(data_path('sample.mp4'), max_frames=5)
    assert (vf[3] == f[3]).all() and (vf[2] == f[2]).all() and (vf[3] == f[3]).all() and (vf[0] == f[0]).all()
    span = vf[1:5]
    assert (span[2] == f[3]).all() and (span[1] == f[2]).all()

def test_versioned_library_that_did_not_fit_is_out_of_memory():
    """Kills `_NO_MAP` taking only names that end in `.so` (`[\\w.]*` after it dropped): the loader names versioned libraries
    (`libgomp….so.1`, `libcudnn.so.9`); those are out of memory too, in the CLI's one line, named in full."""
    for lib in ('libgomp-a34b3233.so.1', 'libcudnn_ops.so.9.1.0', '_dlib_pybind11.cpython-311-x86_64-linux-gnu.so'):
        msg = f'{lib}: failed to map segment from shared object'
        for e in (ImportError(msg), RuntimeError(f'Failed to import diffusers.models because of:\n{msg}')):
            assert out_of_memory(e), e
            assert oom_words(e) == f'could not load {lib}', oom_words(e)

def test_stream_choice_at_the_threshold(tmp_path, monkeypatch):
    """Kills `_stream_choice` streaming at exactly `STREAM_ABOVE_GB` (`>` made `>=`): 'more than' the threshold streams, equal
    does not; no out=, never streamed automatically."""
    from ipfacediff import pipeline as P
    cfg = EditConfig('x', **SMOKE, max_frames=4).validate()
    monkeypatch.setattr(V, 'STREAM_ABOVE_GB', 4 * 640 * 360 * 3 / 2**30)          # exactly the 4 frames' bytes
    assert P._stream_choice(None, data_path('sample.mp4'), tmp_path / 'o.mp4', cfg) is False
    monkeypatch.setattr(V, 'STREAM_ABOVE_GB', (4 * 640 * 360 * 3 - 1) / 2**30)
    assert P._stream_choice(None, data_path('sample.mp4'), tmp_path / 'o.mp4', cfg) is True
    assert P._stream_choice(None, data_path('sample.mp4'), None, cfg) is False
