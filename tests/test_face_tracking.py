"""Which face `track_faces` follows (position, gaps, restarts) and where `detect_faces` looks (full-size retry in large
frames), on real frames of the sample clip with the real dlib models."""
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


def two_faces(f, hide=False):
    "`f` on the left of a grey 1280×360 frame (face ~260 px), a 0.6× copy on the right (~155 px); `hide`: big face blurred."
    g = np.full((360, 1280, 3), 128, np.uint8); g[:, :640] = f
    g[72:288, 760:1144] = cv2.resize(f, (384, 216), interpolation=cv2.INTER_AREA)
    if hide: g[60:, 320:620] = cv2.GaussianBlur(g[60:, 320:620], (0, 0), 25)
    return g


def small_face(f, k, H=1440, W=2560, at=(500, 900)):
    "`f` shrunk by `k` (the sample's face is ~259 px wide) pasted at `at` (y, x) into a grey H × W frame."
    g = np.full((H, W, 3), 128, np.uint8); s = cv2.resize(f, None, fx=k, fy=k, interpolation=cv2.INTER_AREA)
    g[at[0]:at[0] + s.shape[0], at[1]:at[1] + s.shape[1]] = s
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
    # what the tracker did before it followed positions, for a clip with one face per frame (the sample)
    sub = frames[::5]
    tr = track_faces(sub, progress=False)
    assert tr.detected.all() and (tr.n_faces == 1).all()
    for f, b, lm in zip(sub, tr.boxes, tr.landmarks):
        assert np.array_equal(b, detect_faces(f)[0]) and np.array_equal(lm, face_landmarks(f, b))


def test_tracker_id_names_the_rules():
    assert f'tracking rules {F._TRACKING_RULES}' in tracker_id() and F._TRACKING_RULES >= 2


# ---------------------------------------------------------------- large frames

def test_small_face_in_large_frame_is_found(frames):
    clip = np.stack([small_face(frames[i], 0.4) for i in (0, 10, 20)])   # faces ~105 px in 2560×1440
    tr = track_faces(clip, progress=False)                           # was: UserError 'no face found'
    assert tr.detected.all()
    w = tr.boxes[:, 2] - tr.boxes[:, 0]
    assert ((w > 95) & (w < 135)).all(), w
    for f, b in zip(clip, tr.boxes): assert np.array_equal(b, detect_faces(f, max_side=2560)[0])


def test_no_face_advice_is_true(frames):
    g = small_face(frames[0], 0.2, H=720, W=1280)                     # a ~52 px face: too small for HOG
    with pytest.raises(UserError, match='scale up a video whose face is smaller'): track_faces(g[None], progress=False)
    up = cv2.resize(g, (2560, 1440), interpolation=cv2.INTER_CUBIC)    # "scale up": shrunk to 1024 wide, then retried
    assert track_faces(up[None], progress=False).detected.all()
    assert track_faces(g[None], upsample=1, progress=False).detected.all()   # "upsample=1 finds smaller faces"


def test_full_size_search_only_where_needed(frames, monkeypatch):
    calls, hog = [], F._hog
    monkeypatch.setattr(F, '_hog', lambda gray, s, up: calls.append((gray.shape, round(s, 3))) or hog(gray, s, up))
    grey = np.full((1440, 2560, 3), 128, np.uint8)
    assert len(detect_faces(cv2.resize(frames[0], (2560, 1440)))) == 1 and calls == [((1440, 2560), 0.4)]
    calls.clear(); assert len(detect_faces(grey)) == 0 and calls == [((1440, 2560), 0.4), ((1440, 2560), 1.0)]
    calls.clear(); assert len(detect_faces(grey[:360, :640])) == 0 and calls == [((360, 640), 1.0)]   # never twice
