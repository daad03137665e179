"""Which face `track_faces` follows (position, a lone face of its size, gaps, restarts) and where it looks (the whole
clip again at full size when no reduced frame shows a face), on real frames of the sample clip with the real dlib models;
and that the track cache follows the tracking rules."""
import os, warnings
os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import cv2, numpy as np, pytest
import ipfacediff.faces as F
from ipfacediff.faces import track_faces, detect_faces, face_landmarks, tracker_id
from ipfacediff.utils import UserError, data_path
from ipfacediff.video import read_video


@pytest.fixture(scope='module')
def frames():
    return read_video(data_path('sample.mp4'), progress=False)[0]


from shared import two_faces


def small_face(f, k, H=1440, W=2560, at=(500, 900)):
    "`f` shrunk by `k` (the sample's face is ~259 px wide) pasted at `at` (y, x) into a grey H × W frame."
    g = np.full((H, W, 3), 128, np.uint8); s = cv2.resize(f, None, fx=k, fy=k, interpolation=cv2.INTER_AREA)
    g[at[0]:at[0] + s.shape[0], at[1]:at[1] + s.shape[1]] = s
    return g


def moving(f, i, stray=False):
    "`f` shrunk to 0.4× (face ~105 px) at x = 40 + 60 i in a grey 1024×576 frame; `stray`: a 0.7× copy (~180 px) lower right."
    g = np.full((576, 1024, 3), 128, np.uint8)
    g[20:164, 40 + 60 * i:296 + 60 * i] = cv2.resize(f, (256, 144), interpolation=cv2.INTER_AREA)
    if stray: g[300:552, 520:968] = cv2.resize(f, (448, 252), interpolation=cv2.INTER_AREA)
    return g


def tracked(clip, **kw):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always'); tr = track_faces(clip, progress=False, **kw)
    return tr, [str(x.message) for x in w]


# ---------------------------------------------------------------- which face is followed

def test_missed_frame_does_not_hand_the_track_to_a_bystander(frames):
    clip = np.stack([two_faces(frames[i], hide=i == 1) for i in range(4)])
    assert [len(detect_faces(f)) for f in clip] == [2, 1, 2, 2]       # frame 1: only the bystander is seen
    tr, said = tracked(clip)
    assert tr.detected.tolist() == [True, False, True, True] and tr.n_faces.tolist() == [2, 1, 2, 2]
    assert (tr.boxes[:, 2] < 640).all(), tr.boxes[:, 0]               # was x0 [321, 945, 962, 962]
    np.testing.assert_allclose(tr.boxes[1], (tr.boxes[0] + tr.boxes[2]) / 2)
    np.testing.assert_allclose(tr.landmarks[1], (tr.landmarks[0] + tr.landmarks[2]) / 2)
    assert any('not found in 1 of 4 frames (in 1 of them only other faces were seen)' in m for m in said), said
    assert any('largest where the track starts, then followed by its position' in m for m in said), said


def test_largest_face_starts_the_track_and_a_smaller_one_is_kept(frames):
    # the track starts on the only face in frame 0 (the small one) and keeps it when a bigger one appears
    clip = np.stack([two_faces(frames[0], hide=True), two_faces(frames[1]), two_faces(frames[2])])
    tr, _ = tracked(clip)
    assert tr.detected.all() and (tr.boxes[:, 0] > 640).all(), tr.boxes[:, 0]


def test_long_gap_starts_afresh_with_the_largest_face(frames):
    clip = np.stack([two_faces(frames[i], hide=i in (1, 2, 3)) for i in range(5)])
    tr, said = tracked(clip, max_gap=1)                               # frame 3 is 3 frames after the last sighting
    assert tr.detected.tolist() == [True, False, False, True, True]
    assert tr.boxes[0, 2] < 640 and (tr.boxes[3:, 0] > 640).all()     # the bystander from the restart on
    assert any('started afresh with the largest face at frame 3; it may be another person' in m for m in said), said
    tr, said = tracked(clip)                                          # default max_gap=25: waits for the face
    assert tr.detected.tolist() == [True, False, False, False, True] and (tr.boxes[:, 2] < 640).all()
    assert not any('afresh' in m for m in said)


def test_fast_face_is_followed_despite_one_stray_detection(frames):
    # 60 px per frame is more than half the ~105 px face's side: never "continued"; frame 3 shows a second face
    clip = np.stack([moving(frames[i], i, stray=i == 3) for i in range(7)])
    tr, said = tracked(clip)
    assert tr.n_faces.tolist() == [1, 1, 1, 2, 1, 1, 1]
    assert tr.detected.tolist() == [True, True, True, False, True, True, True]   # was [True] + [False] * 6, held at frame 0
    assert (np.diff(tr.boxes[:, 0]) > 40).all() and (tr.boxes[:, 3] < 200).all(), tr.boxes
    for i in (0, 1, 2, 4, 5, 6): assert np.array_equal(tr.boxes[i], detect_faces(clip[i])[0])
    np.testing.assert_allclose(tr.boxes[3], detect_faces(clip[3])[1], atol=10)  # interpolated where the face is
    assert not any('afresh' in m for m in said)


def test_lone_bystander_is_refused(frames):
    # one face per frame: the big face, except frame 1 where only the 0.6x bystander is seen (the old shortcut took it)
    def alone(f, big):
        g = two_faces(f, hide=not big)
        if big: g[:, 640:] = 128
        return g
    clip = np.stack([alone(frames[i], big=i != 1) for i in range(4)])
    tr, said = tracked(clip)
    assert tr.n_faces.tolist() == [1, 1, 1, 1] and tr.detected.tolist() == [True, False, True, True]
    assert (tr.boxes[:, 2] < 640).all(), tr.boxes[:, 0]
    assert any('in 1 of them only other faces were seen' in m for m in said), said


def test_hidden_face_comes_back_from_a_same_size_bystander(frames):
    "Two people of one size; the followed one is hidden for 3 frames, where the other is the only face: the track jumps there but comes back."
    clip = np.concatenate([frames[:12, :, ::-1], frames[:12]], axis=2).copy()   # mirrored copy on the left, 1280 px wide
    first = track_faces(clip[:1], progress=False)
    left = first.boxes[0, 2] < 640
    hide = slice(0, 640) if left else slice(640, 1280)
    clip[5:8, :, hide] = 90                                                     # the followed face is hidden in frames 5-7
    tr, said = tracked(clip)
    on_side = (tr.boxes[:, 2] < 640) if left else (tr.boxes[:, 0] > 640)
    assert on_side.all(), tr.boxes[:, 0]                                        # was: the other person from frame 5 on
    assert tr.detected.tolist() == [True] * 5 + [False] * 3 + [True] * 4
    assert any('in 3 of them only other faces were seen' in m for m in said), said


def test_no_smoothing_across_a_cut(frames):
    "The same person mirrored to the other side from frame 10: the crops beside the cut are their own frame's, not a blend."
    clip = np.concatenate([frames[:10], frames[10:20, :, ::-1]])
    tr, _ = tracked(clip)
    raw, sm = tr.raw_quads.mean(1), tr.quads.mean(1)
    side = np.linalg.norm(tr.quads[:, 3] - tr.quads[:, 0], axis=-1)
    assert (np.abs(raw[8:12, 0] - sm[8:12, 0]) < 0.05 * side[8:12]).all(), (raw[8:12, 0], sm[8:12, 0])   # was 25 %


def test_follow_rules():
    box = lambda x, side=100.: np.array([[x, 0, x + side, side]], float)
    both = lambda *b: np.concatenate(b)
    # 0.6 side per frame, one false positive (a small box far away) in frame 3: every other frame keeps its lone face
    fast = [box(60 * i) if i != 3 else both(box(180), box(900, 40)) for i in range(7)]
    assert F._follow(fast, 25) == ([0, 0, 0, None, 0, 0, 0], [])
    assert F._follow([box(0), box(0, 60), box(0, 160)], 25) == ([0, None, None], [])  # a lone face of another size: refused
    assert F._follow([box(0), box(400, 140), box(0, 60)], 25) == ([0, 0, None], [])  # within 1.5x, anywhere: taken
    assert F._follow([box(0), np.zeros((0, 4)), np.zeros((0, 4)), box(500)], 25) == ([0, None, None, 0], [])  # back elsewhere
    assert F._follow([box(0), both(box(300), box(500))], 25) == ([0, None], [])      # two faces, neither continues it
    assert F._follow([box(0), box(0, 60), box(0, 60), box(500)], 1) == ([0, None, None, 0], [3])   # after max_gap: a restart


def test_continues_tolerances():
    prev = np.array([100., 100., 200., 200.])                         # side 100, centre (150, 150)
    box = lambda dx, side=100.: np.array([[150 + dx - side / 2, 150 - side / 2, 150 + dx + side / 2, 150 + side / 2]])
    assert F._continues(prev, box(45), 1) == 0 and F._continues(prev, box(55), 1) is None
    assert F._continues(prev, box(55), 2) == 0                        # +0.1 side per frame since the last sighting
    assert F._continues(prev, box(105), 50) is None                   # never more than one side
    assert F._continues(prev, box(0, 160), 1) is None and F._continues(prev, box(0, 140), 1) == 0
    assert F._continues(prev, np.concatenate([box(-40), box(20), box(300)]), 1) == 1   # the nearest
    assert F._continues(prev, np.zeros((0, 4)), 1) is None


def test_one_face_clip_takes_every_frames_face(frames):
    # a clip with one face per frame (the sample, 0.5 s between frames): every frame's face is taken
    sub = frames[::5]
    tr = track_faces(sub, progress=False)
    assert tr.detected.all() and (tr.n_faces == 1).all()
    for f, b, lm in zip(sub, tr.boxes, tr.landmarks):
        assert np.array_equal(b, detect_faces(f)[0]) and np.array_equal(lm, face_landmarks(f, b))


def test_track_cache_key_follows_the_tracking_rules(frames, tmp_path, monkeypatch):
    "A face track cached by the pipeline (and a metrics embedding) is not reused once `faces._TRACKING_RULES` changes."
    from types import SimpleNamespace
    import ipfacediff.pipeline as P, ipfacediff.metrics as M
    pipe, cfg, clip, src = SimpleNamespace(cache_dir=tmp_path, progress=False), P.EditConfig('x', size=64), frames[:2], data_path('sample.mp4')
    try:
        tracker_id.cache_clear()
        assert [P.face_track(pipe, clip, cfg, src)[1] for _ in range(2)] == [False, True]   # tracked, then read from the cache
        emb_key = M._cache_key('digest', 'recognizer', {})
        monkeypatch.setattr(F, '_TRACKING_RULES', F._TRACKING_RULES + 1); tracker_id.cache_clear()
        assert P.face_track(pipe, clip, cfg, src)[1] is False                             # the old track is not reused
        assert len(list((tmp_path / 'tracks').glob('*.npz'))) == 2
        assert M._cache_key('digest', 'recognizer', {}) != emb_key
    finally:
        monkeypatch.undo(); tracker_id.cache_clear()


# ---------------------------------------------------------------- large frames

def test_small_face_in_large_frame_is_found(frames):
    clip = np.stack([small_face(frames[i], 0.4) for i in (0, 10, 20)])   # faces ~105 px in 2560×1440
    assert not any(len(detect_faces(f)) for f in clip)                # ~42 px in the 1024×576 copies
    tr = track_faces(clip, progress=False)                           # the whole clip again at full size
    assert tr.detected.all()
    w = tr.boxes[:, 2] - tr.boxes[:, 0]
    assert ((w > 95) & (w < 135)).all(), w
    for f, b in zip(clip, tr.boxes): assert np.array_equal(b, detect_faces(f, max_side=2560)[0])


def test_no_face_advice_is_true(frames):
    g = small_face(frames[0], 0.2, H=720, W=1280)                     # a ~52 px face: too small for HOG
    with pytest.raises(UserError, match='scale up a video whose face is smaller'): track_faces(g[None], progress=False)
    up = cv2.resize(g, (2560, 1440), interpolation=cv2.INTER_CUBIC)    # "scale up": shrunk to 1024 wide, then the clip at full size
    assert track_faces(up[None], progress=False).detected.all()
    assert track_faces(g[None], upsample=1, progress=False).detected.all()   # "upsample=1 finds smaller faces"


def test_full_size_search_only_for_a_clip_without_a_face(frames, monkeypatch):
    calls, hog = [], F._hog
    monkeypatch.setattr(F, '_hog', lambda gray, s, up: calls.append((gray.shape, round(s, 3))) or hog(gray, s, up))
    grey, big = np.full((1440, 2560, 3), 128, np.uint8), cv2.resize(frames[0], (2560, 1440))
    reduced, full = ((1440, 2560), 0.4), ((1440, 2560), 1.0)
    assert len(detect_faces(big)) == 1 and calls == [reduced]
    calls.clear(); assert len(detect_faces(grey)) == 0 and calls == [reduced]       # one search per frame, found or not
    # the face is found in the reduced copies: frames without it (a turned head, a cutaway) are not searched again
    calls.clear(); tr, _ = tracked(np.stack([big, grey, grey]), workers=1)
    assert tr.detected.tolist() == [True, False, False] and calls == [reduced] * 3
    # no reduced copy shows a face: the whole clip again at full size
    calls.clear(); tr, _ = tracked(np.stack([small_face(frames[0], 0.4), grey]), workers=1)
    assert tr.detected.tolist() == [True, False] and calls == [reduced] * 2 + [full] * 2
    calls.clear()
    with pytest.raises(UserError, match='no face found'): track_faces(grey[None], workers=1, progress=False)
    assert calls == [reduced, full]
    calls.clear()
    with pytest.raises(UserError, match='no face found'): track_faces(grey[None, :360, :640], workers=1, progress=False)
    assert calls == [((360, 640), 1.0)]                                             # frames up to max_side: never twice
