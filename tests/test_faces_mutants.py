"""Invariants of `ipfacediff.faces` that no other test pinned down (mutation review of detection, smoothing, alignment,
the face mask and the paste-back: each test fails on at least one code change that the notebook's checks and the rest
of tests/ let through). What they pin: a detector box is dlib's own rectangle as (x0, y0, x1, y1) with exclusive x1, y1,
and the landmarks are dlib's for that very rectangle; `smooth_sigma[0]` smooths the crop centres and `smooth_sigma[1]`
the `x` vectors (size and angle), the default being STIT's σ 1 for centres; `align_faces` refuses a track of another
length; the 'face' mask reaches 0.6 × the eye-to-mouth distance above the brows; the paste-back is the linear blend
frame + mask · (crop − frame), rounded (a feathered edge, not a hard cut-out); crops of another size than the track's
are resized, not cut. Real frames of the sample clip with the real dlib models, or synthetic frames; offline, one core."""
import os

os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import cv2, numpy as np, pytest
from scipy.ndimage import gaussian_filter1d

from ipfacediff.faces import (FaceTrack, align_faces, crop_matrix, detect_faces, face_landmarks, face_mask, paste_back,
                              quad_corners, track_faces)
from ipfacediff.utils import UserError, data_path
from ipfacediff.video import read_video


@pytest.fixture(scope='module')
def frames():
    return read_video(data_path('sample.mp4'), max_frames=12, progress=False)[0]


def hand_lm(S):
    "68 hand-placed landmarks of a frontal face in an S×S crop (jaw, brows, eyes and mouth corners are what is used)."
    lm = np.zeros((68, 2))
    a = np.linspace(np.pi, 0, 17)
    lm[0:17] = np.c_[256 - 150 * np.cos(a), 250 + 170 * np.sin(a)]       # jaw: lower half-ellipse, ear to ear
    lm[17:27] = np.c_[np.linspace(150, 362, 10), np.full(10, 200)]       # brows at y = 200
    lm[36:42] = np.c_[np.linspace(180, 230, 6), np.full(6, 235)]         # eyes at y = 235
    lm[42:48] = np.c_[np.linspace(282, 332, 6), np.full(6, 235)]
    lm[48], lm[54] = (210, 360), (302, 360)                              # mouth corners at y = 360
    return lm * S / 512


def one_frame_track(size=64, frame_size=(128, 128), c=(64.0, 64.0), half=40.0):
    "A one-frame FaceTrack by hand: the quad centred at `c` with half-side `half`, eye line horizontal; the face found."
    M = crop_matrix(np.array(c), np.array([half, 0.0]), size)
    Minv = np.linalg.inv(np.vstack([M, [0, 0, 1]]))[:2]
    lm = hand_lm(size) @ Minv[:, :2].T + Minv[:, 2]
    q = quad_corners(np.array(c), np.array([half, 0.0]))[None]
    return FaceTrack(size=size, frame_size=frame_size, landmarks=lm[None], boxes=np.zeros((1, 4)), detected=np.ones(1, bool),
                     n_faces=np.ones(1, int), raw_quads=q, quads=q, crop_from_frame=M[None], frame_from_crop=Minv[None])


# ---------------------------------------------------------------- detection

def test_box_is_dlibs_rectangle_and_landmarks_are_dlibs_for_it(frames):
    """Kills M01 (box x1, y1 = dlib's inclusive right/bottom, one pixel short) and M05 (landmarks predicted in a rectangle
    one pixel larger than the detector's): on a frame below `max_side` (no rescaling) the box is dlib's HOG rectangle as
    (left, top, right + 1, bottom + 1), and `face_landmarks` on it gives dlib's shape predictor on that same rectangle."""
    import dlib
    from ipfacediff.faces import dlib_model_path
    gray = cv2.cvtColor(frames[0], cv2.COLOR_RGB2GRAY)
    rects = dlib.get_frontal_face_detector()(gray, 0)
    assert len(rects) == 1
    r = rects[0]
    box = detect_faces(frames[0])
    np.testing.assert_array_equal(box, [[r.left(), r.top(), r.right() + 1, r.bottom() + 1]])
    assert box[0, 2] - box[0, 0] == r.width() and box[0, 3] - box[0, 1] == r.height()
    shape = dlib.shape_predictor(str(dlib_model_path()))(gray, r)
    want = np.array([[p.x, p.y] for p in shape.parts()], np.float64)
    np.testing.assert_array_equal(face_landmarks(frames[0], box[0]), want)


# ---------------------------------------------------------------- smoothing over time

def _centres_and_x(quads):
    "Centre and x vector (half the top edge, along the eye line) of quads (N, 4, 2) in quad_corners' order."
    return quads.mean(1), (quads[:, 3] - quads[:, 0]) / 2


def test_smooth_sigma_first_is_the_centres_second_the_size_and_angle(frames):
    """Kills M30 (the two sigmas swapped): `smooth_sigma = (σ_centre, σ_x)`, STIT's centre_sigma 1 and xy_sigma 3 by
    default. σ_x = 0 leaves the x vectors as detected, σ_centre = 0 the centres; with the defaults the centres are the
    detected ones under a Gaussian of σ 1 frame (ends held), computed here with scipy (the 12 frames hold no jump)."""
    f = frames[:12]
    tr = track_faces(f, smooth_sigma=(1.0, 0), progress=False)
    raw_c, raw_x = _centres_and_x(tr.raw_quads)
    c, x = _centres_and_x(tr.quads)
    np.testing.assert_allclose(x, raw_x, rtol=0, atol=1e-9)            # sizes and angles as found
    assert np.abs(c - raw_c).max() > 0.1                                # centres smoothed
    tr = track_faces(f, smooth_sigma=(0, 3.0), progress=False)
    c, x = _centres_and_x(tr.quads)
    np.testing.assert_allclose(c, raw_c, rtol=0, atol=1e-9)            # centres as found
    assert np.abs(x - raw_x).max() > 0.1
    tr = track_faces(f, progress=False)
    assert (np.linalg.norm(np.diff(raw_c, axis=0), axis=-1) < np.linalg.norm(raw_x[:-1], axis=-1)).all()   # no jump
    c, x = _centres_and_x(tr.quads)
    np.testing.assert_allclose(c, gaussian_filter1d(raw_c, 1.0, axis=0, mode='nearest'), rtol=0, atol=1e-6)
    np.testing.assert_allclose(x, gaussian_filter1d(raw_x, 3.0, axis=0, mode='nearest'), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- alignment

def test_align_faces_refuses_a_track_of_another_length(frames):
    """Kills M36 (length check dropped): 3 frames with a 4-frame track would zip to 3 crops and leave the 4th crop as
    uninitialised memory (np.empty); the mismatch is refused, naming both counts."""
    tr = track_faces(frames[:4], progress=False)
    with pytest.raises(UserError, match='3 frames but the face track has 4'):
        align_faces(frames[:3], tr, progress=False)


def test_an_empty_stretch_of_a_track_aligns_and_pastes_nothing(frames):
    "`track.sub(0, 0)` (no frames) gives no crops and no pasted frames: once `paste_back` failed in `np.stack` of nothing."
    tr = track_faces(frames[:3], progress=False).sub(0, 0)
    crops = align_faces(frames[:0], tr, progress=False)
    assert crops.shape == (0, 512, 512, 3) and tr.crop_landmarks().shape == (0, 68, 2)
    assert len(paste_back(frames[:0], crops, tr, progress=False)) == 0


# ---------------------------------------------------------------- the face mask

def test_face_mask_forehead_reaches_0_6_eye_to_mouth_above_the_brows():
    """Kills M37 (forehead 0.3 instead of 0.6 × eye-to-mouth): brows at y 200, eyes 235, mouth 360 → the 'face' region's
    top edge is 200 − 0.6·125 = 125 (crop px, 512²); with no dilation (the 1 px floor at ¼ size is 4 px) and the edge's
    0.5 level on it, the mask on the centre column first passes 0.5 within a few px of 121, well above the eyes' 235."""
    m = face_mask(hand_lm(512), 512, dilate=0.0, feather=0.01)
    top = int(np.flatnonzero(m[:, 256] > 0.5)[0])
    assert 113 <= top <= 129, top
    assert m[140, 256] > 0.99 and m[100, 256] < 0.01


# ---------------------------------------------------------------- the paste-back

def test_paste_back_is_the_rounded_linear_blend_with_the_mask():
    """Kills M44 (crop written wherever the mask is > 0: a hard cut-out edge) and M45 (truncation): a white crop pasted
    into a black frame gives round(255 · mask) in every pixel, so the feathered rim holds every grey level in between."""
    tr = one_frame_track()
    frames = np.zeros((1, 128, 128, 3), np.uint8)
    crops = np.full((1, 64, 64, 3), 255, np.uint8)
    out, masks = paste_back(frames, crops, tr, return_masks=True, progress=False, warn=False)
    want = np.round(np.float32(255) * masks[0])                          # 0 + m · (255 − 0), rounded to the nearest level
    np.testing.assert_array_equal(out[0], np.broadcast_to(want[..., None], out[0].shape))
    rim = (masks[0] > 0.05) & (masks[0] < 0.95)
    assert rim.sum() > 50 and len(np.unique(out[0][rim])) > 20       # a soft edge, many grey levels
    # and the other way round: black into white is 255 − round(255 · mask)
    out = paste_back(np.full_like(frames, 255), np.zeros_like(crops), tr, progress=False, warn=False)
    np.testing.assert_array_equal(out[0], np.broadcast_to((255 - want)[..., None], out[0].shape))


def test_paste_back_resizes_crops_of_another_size():
    """Kills M50 (crops of another size pasted unresized, so only their top-left corner lands on the face): crops 2× the
    track's size made by repeating each pixel 2 × 2 are area-shrunk back to the very same crops, so they paste the same pixels."""
    tr = one_frame_track()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    crop = np.stack([xx * 4, yy * 4, 255 - xx * 2], -1).astype(np.uint8)[None]          # a gradient: where it lands shows
    crop = np.clip(crop.astype(int) + rng.integers(-8, 9, crop.shape), 0, 255).astype(np.uint8)
    frames = np.full((1, 128, 128, 3), 90, np.uint8)
    small = paste_back(frames, crop, tr, progress=False, warn=False)
    big = paste_back(frames, crop.repeat(2, 1).repeat(2, 2), tr, progress=False, warn=False)
    assert (small != frames).any()
    np.testing.assert_array_equal(big, small)
