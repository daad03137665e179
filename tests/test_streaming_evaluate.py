"`ipfacediff evaluate` without holding videos: one video's frames in memory at a time, and none with `stream` — the same report."
import os, weakref
from pathlib import Path
import numpy as np, pytest, cv2

os.environ.setdefault('OMP_NUM_THREADS', '1')
from ipfacediff import metrics as M, video as V
from ipfacediff.utils import data_path
from ipfacediff.video import read_video, write_video, VideoFrames

from cli_helpers import run_inprocess
from shared import evaluate_report

PROMPTS = dict(prompt='a smiling face', source_prompt='a face')


@pytest.fixture(scope='module')
def work(tmp_path_factory):
    """orig/: the sample clip (8 frames, 320×180) and a still of another face, an original no edit is paired with;
    colour/: its edit in other colours; big/: an edit at 1.5× the size and one frame shorter."""
    import skimage.data
    from PIL import Image
    w = tmp_path_factory.mktemp('stream_eval')
    fr = read_video(data_path('sample.mp4'), max_frames=8, progress=False)[0]
    clip = np.stack([cv2.resize(f, (320, 180), interpolation=cv2.INTER_AREA) for f in fr])
    for d in ('orig', 'colour', 'big'): (w / d).mkdir()
    write_video(w / 'orig' / 'clip.mp4', clip, 10)
    Image.fromarray(skimage.data.astronaut()).save(w / 'orig' / 'astronaut.png')
    edit = M.degrade(clip, 'color', seed=2)
    write_video(w / 'colour' / 'clip.mp4', edit, 10)
    write_video(w / 'big' / 'clip.mp4', np.stack([cv2.resize(f, (480, 270), interpolation=cv2.INTER_CUBIC) for f in edit[:7]]), 10)
    return w


@pytest.fixture(scope='module')
def clip():
    from ipfacediff.losses import tiny_clip
    return tiny_clip(0)


def _run(work, out, monkeypatch, **kw):
    "evaluate() on the fixture, and the kind of frames each read gave (`media_frames` spied)."
    kinds, real = [], M.media_frames
    def spy(path, *a, **k):
        fr, rate = real(path, *a, **k); kinds.append((f'{Path(path).parent.name}/{Path(path).name}', type(fr).__name__)); return fr, rate
    monkeypatch.setattr(M, 'media_frames', spy)
    res = M.evaluate(work / 'orig', [work / 'colour', work / 'big'], work / out, progress=False, **kw)
    monkeypatch.setattr(M, 'media_frames', real)
    return res, kinds



def test_a_streamed_evaluation_writes_the_held_ones_report(work, clip, monkeypatch):
    "Identity, ranking, warp error, TL/TG-ID and the CLIP direction: the same numbers when every video is decoded where used."
    res_h, kinds_h = _run(work, 'held', monkeypatch, stream=False, clip=clip, **PROMPTS)
    res_s, kinds_s = _run(work, 'streamed', monkeypatch, stream=True, clip=clip, **PROMPTS)
    assert {k for _, k in kinds_h} == {'ndarray'}
    assert {n for n, _ in kinds_s} == {'orig/clip.mp4', 'orig/astronaut.png', 'colour/clip.mp4', 'big/clip.mp4'}
    assert all(k == ('ndarray' if n.endswith('.png') else 'VideoFrames') for n, k in kinds_s), kinds_s   # a still is held whatever `stream` says
    v = res_s['methods']['big']['videos']['clip']
    assert v['n_frames_edited'] == 7 and v['size_edited'] == [270, 480] and v['face_found'] and v['clip_direction'] is not None
    assert res_s['methods']['colour']['videos']['clip']['warp_error'] > 0 and res_s['gallery_size'] == 2
    held, streamed = evaluate_report(work / 'held'), evaluate_report(work / 'streamed')
    assert 'per_video/big/clip.csv' in held and held.keys() == streamed.keys()
    for k in held: assert streamed[k] == held[k], k


def test_unasked_a_video_streams_only_above_the_limit(work, monkeypatch):
    "stream=None: a file whose frames would take more than `video.STREAM_ABOVE_GB` is streamed; at or below it, held."
    one = 8 * 180 * 320 * 3                                              # the original's frames, in bytes
    monkeypatch.setattr(V, 'STREAM_ABOVE_GB', one / 2**30)
    _, kinds = _run(work, 'at_limit', monkeypatch)                      # the 1.5× edit (7 × 270 × 480 × 3 bytes) is over it
    assert dict(kinds) == {'orig/clip.mp4': 'ndarray', 'orig/astronaut.png': 'ndarray', 'colour/clip.mp4': 'ndarray',
                           'big/clip.mp4': 'VideoFrames'}, kinds
    monkeypatch.setattr(V, 'STREAM_ABOVE_GB', (one - 1) / 2**30)
    _, kinds = _run(work, 'below_limit', monkeypatch)
    assert dict(kinds) == {'orig/clip.mp4': 'VideoFrames', 'orig/astronaut.png': 'ndarray', 'colour/clip.mp4': 'VideoFrames',
                           'big/clip.mp4': 'VideoFrames'}, kinds


def test_one_video_in_memory_at_a_time(work, monkeypatch):
    "Held, each video is let go before the next is read: originals are not kept for their edits, nor an edit for the next."
    alive, real, seen = [], M.load_media, []
    def spy(*a, **k):
        out = real(*a, **k)
        fr = out[0] if isinstance(out, tuple) else out
        if len(fr) > 1:                                   # not the one-frame rate probes
            seen.append([r() is not None for r in alive])
            alive.append(weakref.ref(fr))
        return out
    monkeypatch.setattr(M, 'load_media', spy)
    M.evaluate(work / 'orig', [work / 'colour', work / 'big'], work / 'one_at_a_time', stream=False, progress=False)
    assert len(seen) == 3, seen                            # the original, then each edit (the still is one frame)
    assert not any(any(s) for s in seen), seen            # when a video was read, no earlier one was still in memory


def test_embeddings_take_the_crops_a_batch_at_a_time(work, monkeypatch):
    "embed_frames never cuts all crops at once: the recognizer sees `batch_size` crops a call, from held or streamed frames alike."
    sizes, real = [], M.frame_embeddings
    monkeypatch.setattr(M, 'frame_embeddings', lambda crops, *a, **k: sizes.append(len(crops)) or real(crops, *a, **k))
    class Mean:                                            # a recognizer with no weights: the crop's mean colour
        def __call__(self, x): return x.mean((2, 3))
    lazy = VideoFrames(work / 'orig' / 'clip.mp4')
    e_l = M.embed_frames(lazy, {'mean': Mean()}, size=64, batch_size=3)['mean']
    e_h = M.embed_frames(read_video(work / 'orig' / 'clip.mp4', progress=False)[0], {'mean': Mean()}, size=64, batch_size=3)['mean']
    assert sizes == [3, 3, 2] * 2
    np.testing.assert_array_equal(e_l.frames, e_h.frames); np.testing.assert_array_equal(e_l.boxes, e_h.boxes)


def test_warp_error_reads_a_video_once_and_checks_its_flow_frames(work):
    from ipfacediff.utils import UserError
    f = VideoFrames(work / 'orig' / 'clip.mp4')
    held = read_video(work / 'orig' / 'clip.mp4', progress=False)[0]
    assert M.warp_error(f, 'dis-fast') == M.warp_error(held, 'dis-fast')
    with pytest.raises(UserError, match=r'flow_frames \(7, 180, 320\) and frames \(8, 180, 320\) differ'):
        M.warp_error(f, flow_frames=f[:7])


def test_the_command_line_streams_on_request(work, clip, capsys, monkeypatch):
    "`ipfacediff evaluate --stream`: the same tables as held; the flag is in the help."
    base = ['evaluate', '--original', work / 'orig', '--edited', work / 'colour', '--quiet']
    r_h = run_inprocess(capsys, monkeypatch, *base, '--out', work / 'cli_held')
    r_s = run_inprocess(capsys, monkeypatch, *base, '--out', work / 'cli_streamed', '--stream')
    assert r_h.returncode == 0 and r_s.returncode == 0, r_s.stderr
    assert r_s.stdout.replace('cli_streamed', 'X') == r_h.stdout.replace('cli_held', 'X')
    from ipfacediff.cli import main
    with pytest.raises(SystemExit): main(['evaluate', '--help'])
    h = ' '.join(capsys.readouterr().out.split())
    assert '--stream' in h and f'{V.STREAM_ABOVE_GB:g} GiB' in h


def test_warp_error_on_threads_is_the_one_thread_number(work):
    """Pairs scored on 4 threads give the 1-thread numbers, for each flow. Each thread has its own DIS object: `calc` on one
    shared object from two threads at once crashed the process (a segmentation fault, within a few hundred pairs)."""
    f = read_video(work / 'orig' / 'clip.mp4', progress=False)[0]
    f = np.concatenate([f, f[::-1]] * 15)                                 # 240 frames of 320×180
    for flow in ('dis', 'dis-fast', 'farneback'):
        one = M.warp_error(f if flow != 'farneback' else f[:40], flow, return_per_frame=True, workers=1)[1]
        four = M.warp_error(f if flow != 'farneback' else f[:40], flow, return_per_frame=True, workers=4)[1]
        np.testing.assert_array_equal(four, one)
