"""Streamed edits (`edit(stream=True)`, `ipfacediff edit --stream`): the video's frames are decoded again at each
stage instead of held in memory. The output must be the one an edit in memory writes, byte for byte, whatever
part of the video the face is in; failures leave nothing behind; `VideoFrames` notices a file that changes."""
import os, resource, shutil, subprocess, sys
from pathlib import Path
import numpy as np, pytest

from ipfacediff import pipeline as P, video as V
from ipfacediff.pipeline import IPFaceDiffPipeline, EditConfig
from ipfacediff.utils import data_path, UserError
from ipfacediff.video import read_video, write_video, VideoFrames

from cli_helpers import run_inprocess

from shared import STREAM_SMOKE as SMOKE, stream_and_hold as both, stream_pipe  # noqa: F401 (the `pipe` fixture)
EXE = shutil.which('ipfacediff') or str(Path(sys.executable).parent / 'ipfacediff')

@pytest.fixture(scope='module')
def late_face(tmp_path_factory):
    "11 frames of the sample whose first 3 and last 2 show no face (grey): the edit spans frames 3–8 only."
    f, info = read_video(data_path('sample.mp4'), max_frames=11, progress=False)
    f = f.copy(); f[:3] = 128; f[-2:] = 90
    p = tmp_path_factory.mktemp('late') / 'late.mp4'
    write_video(p, f, info.fps, audio_from=data_path('sample.mp4'), progress=False)
    return p

def test_face_in_part_of_the_video(pipe, late_face, tmp_path):
    "Frames before and after the face's span pass through; a batch boundary falls inside the span (3 a batch, 6 frames)."
    with pytest.warns(UserWarning):
        rs, rm = both(pipe, late_face, tmp_path)
    assert rs.span == rm.span == (3, 9) and rs.n_frames == rm.n_frames == 11
    assert (tmp_path / 's.mp4').read_bytes() == (tmp_path / 'm.mp4').read_bytes()
    assert (tmp_path / 's_sbs.mp4').read_bytes() == (tmp_path / 'm_sbs.mp4').read_bytes()
    no_inv = lambda d: {k: v for k, v in d.items() if k != 'inversion'}
    assert (rs.cache_hit, rm.cache_hit) == (False, True)                  # the streamed edit's inversion serves the other
    assert no_inv(rs.unet_calls) == no_inv(rm.unet_calls) and rs.unet_calls['inversion'] == 6 * SMOKE['inversion_steps']

def test_resampled_and_cut(pipe, tmp_path):
    "--fps and --max-frames decide the frames the same way for both."
    rs, rm = both(pipe, data_path('sample.mp4'), tmp_path, fps=4, max_frames=7)
    assert rs.n_frames == rm.n_frames == 7 and rs.fps == rm.fps == 4
    assert (tmp_path / 's.mp4').read_bytes() == (tmp_path / 'm.mp4').read_bytes()

def test_automatic_above_the_threshold(pipe, tmp_path, monkeypatch):
    c = EditConfig('add glasses', **SMOKE, max_frames=4)
    monkeypatch.setattr(V, 'STREAM_ABOVE_GB', 4 * 640 * 360 * 3 / 2**30 - 1e-9)      # just below the 4 frames' bytes
    assert pipe.edit(data_path('sample.mp4'), c, out=tmp_path / 'a.mp4').frames is None
    assert pipe.edit(data_path('sample.mp4'), c).frames is not None                   # nowhere to write: held
    monkeypatch.setattr(V, 'STREAM_ABOVE_GB', 4 * 640 * 360 * 3 / 2**30 + 1e-9)
    assert pipe.edit(data_path('sample.mp4'), c, out=tmp_path / 'b.mp4').frames is not None
    assert (tmp_path / 'a.mp4').read_bytes() == (tmp_path / 'b.mp4').read_bytes()

def test_cli_stream_flag(tmp_path, capsys, monkeypatch):
    args = [data_path('sample.mp4'), '--prompt', 'add glasses', '--tiny', '--max-frames', '5', '--steps', '2', '--quiet']
    r1 = run_inprocess(capsys, monkeypatch, 'edit', *args, '--out', tmp_path / 'a.mp4', '--stream', cache=tmp_path / 'c')
    assert r1.returncode == 0, r1.err
    assert 'wrote' in r1.stdout and '5 frames' in r1.stdout and 'decode, paste-back, write' in r1.stdout
    assert 'frames: streamed, decoded from the file again at each stage\n' in r1.stdout
    r2 = run_inprocess(capsys, monkeypatch, 'edit', *args, '--out', tmp_path / 'b.mp4', cache=tmp_path / 'c')
    assert r2.returncode == 0 and 'inversion: reused from the cache' in r2.stdout and 'streamed' not in r2.stdout
    assert (tmp_path / 'a.mp4').read_bytes() == (tmp_path / 'b.mp4').read_bytes()
    monkeypatch.setattr(V, 'STREAM_ABOVE_GB', 0.001)                                  # 5 frames of 640×360: 3.3 MB
    r3 = run_inprocess(capsys, monkeypatch, 'edit', *args, '--out', tmp_path / 'c.mp4', cache=tmp_path / 'c')
    assert r3.returncode == 0 and 'frames: streamed, decoded from the file again at each stage (more than 0.001 GiB of them' in r3.stdout
    assert (tmp_path / 'c.mp4').read_bytes() == (tmp_path / 'a.mp4').read_bytes()

@pytest.mark.parametrize('kib', [64, 400])
def test_full_disk_leaves_nothing(tmp_path, kib):
    """A write that fails while the frames stream in: one line naming the file that failed — the side-by-side, twice as wide,
    reaches the limit first; at 400 KiB the edited video (~325 KiB) would have fitted — no video, no temporary file."""
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1', 'IPFACEDIFF_CACHE': str(tmp_path / 'cache')}
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (kib * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    r = subprocess.run([EXE, 'edit', str(data_path('sample.mp4')), '--prompt', 'add glasses', '--tiny', '--max-frames', '16',
                        '--steps', '2', '--out', 'out.mp4', '--side-by-side', 'sbs.mp4', '--stream', '--quiet'],
                       capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path, preexec_fn=limit)
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == 'ipfacediff: error: File too large: sbs.mp4', r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == []

def test_refused(pipe, tmp_path):
    f, _ = read_video(data_path('sample.mp4'), max_frames=2, progress=False)
    with pytest.raises(UserError, match='give its path'): pipe.edit(f, EditConfig('x', **SMOKE), out=tmp_path / 'x.mp4', fps=10, stream=True)
    with pytest.raises(UserError, match='give out='): pipe.edit(data_path('sample.mp4'), EditConfig('x', **SMOKE), stream=True)
    assert list(tmp_path.iterdir()) == []

def test_video_frames_notices_a_changed_file(tmp_path):
    f, info = read_video(data_path('sample.mp4'), max_frames=6, progress=False)
    p = write_video(tmp_path / 'v.mp4', f, info.fps, progress=False)
    vf = VideoFrames(p)
    assert len(vf) == 6
    write_video(p, f[:4], info.fps, overwrite=True, progress=False)
    with pytest.raises(UserError, match='changed while it was being read'): list(vf)

def test_video_frames_keeps_one_frame(tmp_path):
    "Reading forward holds the frame asked for, not the ones before it."
    import tracemalloc
    vf = VideoFrames(data_path('sample.mp4'))
    len(vf)
    tracemalloc.start()
    for i in range(len(vf)): vf[i]
    peak = tracemalloc.get_traced_memory()[1]; tracemalloc.stop()
    assert peak < 8 * 640 * 360 * 3, peak            # 40 frames held would be 27 MB
