"""Mutation review of `evaluate` holding one video at a time (and none with `stream`): what tests/test_streaming_evaluate.py
left open. Its held-vs-streamed comparison cannot see a mistake both paths share, and its fixture has a face in every frame
and an unpaired original that is read first. Guarded here, each against a known answer: the CLIP direction where the
original and the edit each miss a face in a different frame (index mapping of the original's features), an unpaired
original read after a paired one, `stream` reaching every read (unpaired originals, the gallery; `embed_media`) and the
CLI's automatic streaming, the per-frame CSV's `warp_error_original` column, `warp_error`'s per-pair values and float
frames, a `VideoFrames` never materialised by `warp_error` or the crops, and `crops_at` of no face. The sample clip at 320×180, 8 frames; a mean-colour recognizer; tiny CLIP."""
import csv, os, weakref
from pathlib import Path
os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import cv2, numpy as np, pytest, torch

from ipfacediff import metrics as M, video as V
from ipfacediff.utils import data_path
from ipfacediff.video import read_video, write_video, VideoFrames
from cli_helpers import run_inprocess

PROMPTS = dict(prompt='a smiling face', source_prompt='a face')
GAP_O, GAP_E = 2, 5                       # the original shows no face in frame 2, the edit none in frame 5


class _MeanColour(torch.nn.Module):
    "A recognizer with no weights: the aligned crop's mean colour."
    name = 'mc'
    def forward(self, x): return x.mean((2, 3))


def _clip_frames(n=8):
    fr = read_video(data_path('sample.mp4'), max_frames=n, progress=False)[0]
    return np.stack([cv2.resize(f, (320, 180), interpolation=cv2.INTER_AREA) for f in fr])


@pytest.fixture(scope='module')
def clip_model():
    from ipfacediff.losses import tiny_clip
    return tiny_clip(0)


@pytest.fixture(scope='module')
def work(tmp_path_factory):
    """orig/a.mp4: the clip, frame 2 a flat grey (no face), paired; orig/z.mp4: the astronaut, 2 frames, no edit of it
    (read after `a`); ed/a.mp4: `a` in other colours with frame 5 flat grey and frame 2 the face; gal/g.mp4: the astronaut mirrored, in other colours."""
    import skimage.data
    w = tmp_path_factory.mktemp('stream_eval_mut')
    for d in ('orig', 'ed', 'gal'): (w / d).mkdir()
    clip = _clip_frames()
    o = clip.copy(); o[GAP_O] = 128
    e = M.degrade(clip, 'color', seed=2); e[GAP_E] = 128
    write_video(w / 'orig' / 'a.mp4', o, 10, progress=False)
    write_video(w / 'ed' / 'a.mp4', e, 10, progress=False)
    astro = skimage.data.astronaut()
    write_video(w / 'orig' / 'z.mp4', np.stack([astro, astro]), 10, progress=False)
    write_video(w / 'gal' / 'g.mp4', np.stack([M.degrade(astro[None, :, ::-1], 'color', seed=5)[0]] * 2), 10, progress=False)
    return w


@pytest.fixture(scope='module')
def streamed(work, clip_model):
    "evaluate(stream=True) with CLIP; the kind of frames every `media_frames` call gave, by file."
    kinds, real = {}, M.media_frames
    def spy(path, *a, **k):
        fr, rate = real(path, *a, **k)
        kinds.setdefault(f'{Path(path).parent.name}/{Path(path).name}', []).append(type(fr).__name__)
        return fr, rate
    M.media_frames = spy
    try:
        res = M.evaluate(work / 'orig', work / 'ed', work / 'rep', gallery=work / 'gal', recognizers={'mc': _MeanColour()},
                         stream=True, clip=clip_model, progress=False, **PROMPTS)
    finally: M.media_frames = real
    return res, kinds


def test_clip_direction_pairs_the_original_frame_with_the_edit_frame(work, streamed, clip_model):
    """Kills the original's CLIP features indexed by frame (`clip_orig[n][idx]`), taken as a prefix (`[:len(idx)]`), or
    frames where only the edit shows a face kept (`idx` without the original's mask): the original misses a face in frame 2,
    the edit in frame 5, and the score is that of the crops of frames 0, 1, 3, 4, 6, 7 of both, paired frame by frame."""
    res, _ = streamed
    o, e = (read_video(work / d / 'a.mp4', progress=False)[0] for d in ('orig', 'ed'))
    det_o, b_o = M.face_boxes(o)
    det_e, b_e = M.face_boxes(e, reference_boxes=b_o)
    assert not det_o[GAP_O] and det_e[GAP_O] and det_o[GAP_E] and not det_e[GAP_E]     # the construction
    keep = det_o & det_e
    assert keep.sum() == 6
    want = M.clip_direction_score(M.crops_at(e[keep], b_e[keep]), M.crops_at(o[keep], b_o[keep]), clip=clip_model, target=PROMPTS['prompt'],
                                  source=PROMPTS['source_prompt'])
    v = res['methods']['ed']['videos']['a']
    assert v['frames_without_face_original'] == 1 and v['frames_without_face_edited'] == 1
    assert v['clip_direction'] == pytest.approx(want, rel=1e-6, abs=1e-9)


def test_an_unpaired_original_after_a_paired_one_is_embedded_from_its_own_frames(streamed):
    """Kills the original loop's `fr = None` dropped at its top: `z` (no edit of it, read after `a`) would be embedded from
    `a`'s frames — a copy of `a` in the gallery, so the edit's true original ties with it and ranks 2, not 1."""
    res, kinds = streamed
    assert res['gallery_size'] == 3
    assert 'orig/z.mp4' in kinds                     # read for itself
    assert res['methods']['ed']['videos']['a']['identity']['mc']['rank'] == 1


def test_stream_reaches_unpaired_originals_and_the_gallery(streamed):
    """Kills `stream` left out of `embed_media`'s own read (`media_frames(path, fps, max_frames)`) or of `evaluate`'s
    keyword arguments for it: with stream=True the unpaired original and the gallery video are decoded where used too."""
    _, kinds = streamed
    assert kinds == {'orig/a.mp4': ['VideoFrames'], 'orig/z.mp4': ['VideoFrames'], 'gal/g.mp4': ['VideoFrames'],
                     'ed/a.mp4': ['VideoFrames']}, kinds


def test_embed_media_streams_when_asked(work):
    "Kills `embed_media` ignoring `stream`: its own read of a video file is a `VideoFrames` with stream=True, an array with False."
    seen, real = [], M.embed_frames
    def spy(frames, *a, **k): seen.append(type(frames).__name__); return real(frames, *a, **k)
    M.embed_frames = spy
    try:
        for s in (True, False): M.embed_media(work / 'orig' / 'z.mp4', {'mc': _MeanColour()}, stream=s, size=64)
    finally: M.embed_frames = real
    assert seen == ['VideoFrames', 'ndarray']


def test_per_frame_csv_holds_the_originals_own_warp_error(work, streamed):
    """Kills the per-video CSV's `warp_error_original` column filled from the edit's per-pair values (`wpf`): row t holds
    the original's pair (t−1, t), row 0 none."""
    with open(work / 'rep' / 'per_video' / 'ed' / 'a.csv', newline='') as fh: rows = list(csv.DictReader(fh))
    o, e = (read_video(work / d / 'a.mp4', progress=False)[0] for d in ('orig', 'ed'))
    _, per_o = M.warp_error(o, return_per_frame=True)
    _, per_e = M.warp_error(e, return_per_frame=True)
    assert rows[0]['warp_error_original'] == '' and len(rows) == 8
    np.testing.assert_allclose([float(r['warp_error_original']) for r in rows[1:]], per_o, atol=2e-6)
    np.testing.assert_allclose([float(r['warp_error_edited']) for r in rows[1:]], per_e, atol=2e-6)
    assert np.abs(per_o - per_e).max() > 1e-3                                    # the columns differ: a swap shows


def test_the_command_line_streams_a_video_over_the_limit_unasked(work, capsys, monkeypatch):
    """Kills the CLI passing `stream=a.stream` (False without --stream, which turns the automatic choice off): with
    `STREAM_ABOVE_GB` below one video's size, `ipfacediff evaluate` without --stream decodes the videos where used."""
    kinds, real = [], M.media_frames
    monkeypatch.setattr(M, 'media_frames', lambda p, *a, **k: (lambda r: kinds.append(type(r[0]).__name__) or r)(real(p, *a, **k)))
    monkeypatch.setattr(V, 'STREAM_ABOVE_GB', 1e-6)
    r = run_inprocess(capsys, monkeypatch, 'evaluate', '--original', work / 'orig' / 'a.mp4', '--edited', work / 'ed',
                      '--out', work / 'cli_auto', '--quiet')
    assert r.returncode == 0, r.stderr
    assert kinds == ['VideoFrames', 'VideoFrames'], kinds


def test_warp_error_per_pair_is_that_pairs_own(work):
    """Kills `warp_error` keeping the first frame for the flow (`prev = cur` without `prev_ff = cur_ff`): the value of
    pair t is the warp error of the 2-frame video (I_t, I_{t+1}), with and without `flow_frames`, held and streamed."""
    f = read_video(work / 'ed' / 'a.mp4', max_frames=4, progress=False)[0]
    g = read_video(work / 'orig' / 'a.mp4', max_frames=4, progress=False)[0]
    _, per = M.warp_error(VideoFrames(work / 'ed' / 'a.mp4', max_frames=4), 'dis-fast', return_per_frame=True)
    _, per_ff = M.warp_error(f, 'dis-fast', flow_frames=VideoFrames(work / 'orig' / 'a.mp4', max_frames=4), return_per_frame=True)
    for t in range(3):
        assert per[t] == pytest.approx(M.warp_error(f[t:t + 2], 'dis-fast'), rel=1e-6), t
        assert per_ff[t] == pytest.approx(M.warp_error(f[t:t + 2], 'dis-fast', flow_frames=g[t:t + 2]), rel=1e-6), t


def test_warp_error_of_float_frames_is_that_of_the_uint8_ones(work):
    "Kills `scale` fixed at 255 (float frames in [0, 1] divided again): frames/255 as float32 give the uint8 frames' error."
    f = read_video(work / 'ed' / 'a.mp4', max_frames=3, progress=False)[0]
    e_u8 = M.warp_error(f, 'dis-fast')
    assert e_u8 > 1e-3
    assert M.warp_error(f.astype(np.float32) / 255, 'dis-fast') == pytest.approx(e_u8, rel=1e-4)


def test_warp_error_refuses_flow_frames_of_another_size(work):
    """Kills the `flow_frames` check comparing lengths only: flow frames of the right length at another size are a
    `UserError` naming both shapes (not numpy's broadcasting error halfway through), held or streamed."""
    from ipfacediff.utils import UserError
    f = read_video(work / 'ed' / 'a.mp4', max_frames=3, progress=False)[0]
    small = np.stack([cv2.resize(x, (160, 90), interpolation=cv2.INTER_AREA) for x in f])
    for frames in (f, VideoFrames(work / 'ed' / 'a.mp4', max_frames=3)):
        with pytest.raises(UserError, match=r'flow_frames \(3, 90, 160\) and frames \(3, 180, 320\) differ'):
            M.warp_error(frames, flow_frames=small)


class _Watched(VideoFrames):
    "A `VideoFrames` that counts, each time it decodes a frame, how many frames it gave earlier are still in memory."
    def __iter__(self):
        self.alive, self.most = [], 0
        for fr in super().__iter__():
            self.most = max(self.most, sum(r() is not None for r in self.alive))
            self.alive.append(weakref.ref(fr)); yield fr


def test_warp_error_and_crops_hold_two_frames_of_a_video_frames(work):
    """Kills `_lazy` saying no (`np.asarray` turns a `VideoFrames` into an array: all 8 frames held): `warp_error` keeps
    the frames of the pairs in flight (2 per worker, and the one before them) while the next is decoded, `crop_batches`
    at most the previous frame(s); both give what the held frames give."""
    path = work / 'orig' / 'a.mp4'
    held = read_video(path, progress=False)[0]
    for workers in (1, 2):
        v = _Watched(path)
        assert M.warp_error(v, 'dis-fast', workers=workers) == M.warp_error(held, 'dis-fast')
        assert v.most <= 2 * workers + 1, (workers, v.most)
    v = _Watched(path)
    det, boxes = M.face_boxes(held)
    crops = np.concatenate(list(M.crop_batches(v, boxes, size=64, batch_size=3)))
    assert v.most <= 2, v.most
    np.testing.assert_array_equal(crops, M.crops_at(held, boxes, size=64))


def test_crops_at_no_face_is_empty(work):
    "Kills `_iter_crops` without its no-face guard (`found[-1]` of nothing: IndexError): no finite box gives no crop, as before the change."
    f = read_video(work / 'orig' / 'a.mp4', max_frames=2, progress=False)[0]
    none = np.full((2, 4), np.nan)
    assert M.crops_at(f, none, size=32).shape == (0, 32, 32, 3)
    assert list(M.crop_batches(VideoFrames(work / 'orig' / 'a.mp4', max_frames=2), none, size=32)) == []
