"""Geometry and bookkeeping that no other test pinned down: the paste-back mask (feathered, zero on every crop border),
the crop warp when it shrinks (half-pixel centres kept, area-averaged), the cache keys of the face track (fps) and of
the inversion (dtype), FaceDataset's centre crop and generic captions, the ablations' per-frame identity distance,
and bench's FLOP accounting, scaling ratio and ping-pong sample clip. Direct calls, real sample clip, tiny networks."""
import cv2, numpy as np, pytest, torch
from PIL import Image
from ipfacediff.utils import data_path
from ipfacediff.faces import FaceTrack, crop_matrix, apply_affine, align_faces, face_mask, MASK_REGIONS

torch.set_num_threads(1)
SAMPLE = data_path('sample.mp4')


# ---------------------------------------------------------------- faces: the paste-back mask

def face_landmarks(S):
    "68 hand-placed landmarks of a frontal face in an S×S crop (only jaw, brows, eyes and mouth corners are used)."
    lm = np.zeros((68, 2))
    a = np.linspace(np.pi, 0, 17)                                     # jaw: lower half-ellipse, ear to ear
    lm[0:17] = np.c_[256 - 150 * np.cos(a), 250 + 170 * np.sin(a)]
    lm[17:27] = np.c_[np.linspace(150, 362, 10), np.full(10, 200)]    # brows
    lm[36:42] = np.c_[np.linspace(180, 230, 6), np.full(6, 235)]      # eyes
    lm[42:48] = np.c_[np.linspace(282, 332, 6), np.full(6, 235)]
    lm[48], lm[54] = (210, 360), (302, 360)                           # mouth corners
    return lm * S / 512

@pytest.mark.parametrize('size', [256, 512])
@pytest.mark.parametrize('region', ['face', 'head'])
def test_paste_mask_edge_is_feathered(size, region):
    "No step between neighbouring mask pixels exceeds the border ramp's slope 1/(2σ), σ = feather·size: a hard mask edge shows as a seam."
    feather = 0.025
    m = face_mask(face_landmarks(size), size, feather=feather, region=region)
    assert m.max() > 0.99 and m.min() == 0
    step = max(np.abs(np.diff(m, axis=0)).max(), np.abs(np.diff(m, axis=1)).max())
    assert step <= 1.05 / (2 * feather * size), step        # the Gaussian edge itself: 1/(√(2π)σ), below that

@pytest.mark.parametrize('region', MASK_REGIONS)
def test_paste_mask_is_zero_on_all_four_crop_borders(region):
    "The mask is 0 on every crop border (even the whole-crop region), so the crop's edge never shows in the frame."
    m = face_mask(face_landmarks(256), 256, region=region)
    assert m[128, 128] > 0.99
    for border in (m[0], m[-1], m[:, 0], m[:, -1]): assert border.max() == 0, region


# ---------------------------------------------------------------- faces: the crop warp when it shrinks

def track_of(c, x, size, frame_size):
    "A one-frame FaceTrack cutting the quad (c, x) (align_faces reads only the size and the crop transform)."
    M = crop_matrix(c, x, size)
    z = lambda *s: np.zeros((1, *s))
    return FaceTrack(size=size, frame_size=frame_size, landmarks=z(68, 2), boxes=z(4), detected=np.ones(1, bool),
                     n_faces=np.ones(1, int), raw_quads=z(4, 2), quads=z(4, 2), crop_from_frame=M[None],
                     frame_from_crop=cv2.invertAffineTransform(M)[None])

@pytest.mark.parametrize('half', [128.0, 160.0])   # 64² crops: shrunk 4× and 5×
def test_shrinking_crop_puts_a_point_where_crop_matrix_says(half):
    "A Gaussian blob lands in the crop where crop_matrix maps its centre, to 0.1 px, also when the frame is area-shrunk first."
    H = W = 480
    yy, xx = np.mgrid[:H, :W]
    p = np.array([252.0, 231.0])                                      # the blob's centre, a pixel centre
    blob = (255 * np.exp(-((xx - p[0]) ** 2 + (yy - p[1]) ** 2) / (2 * 24.0 ** 2))).round().astype(np.uint8)
    tr = track_of([240.0, 240.0], [half, 0.0], 64, (H, W))
    crop = align_faces(np.repeat(blob[None, ..., None], 3, -1), tr, progress=False)[0, ..., 0].astype(np.float64)
    w = crop / crop.sum()
    got = np.array([(w * np.arange(64)[None]).sum(), (w * np.arange(64)[:, None]).sum()])   # centroid (x, y)
    want = (p - 240.0) * 64 / (2 * half) + 31.5                       # by hand: the crop's centre is pixel 31.5
    assert np.allclose(want, apply_affine(tr.crop_from_frame[0], p))
    assert np.abs(got - want).max() < 0.1, (got, want)

@pytest.mark.parametrize('shift', [0.0, 0.25, 0.5, 0.75])
def test_shrinking_crop_of_a_checkerboard_is_grey(shift):
    "A 1-px checkerboard cut 4× smaller averages to mid-grey wherever the crop sits; point sampling would alias it to black or white."
    H = W = 480
    yy, xx = np.mgrid[:H, :W]
    board = np.repeat(((xx + yy) % 2 * 255).astype(np.uint8)[None, ..., None], 3, -1)
    crop = align_faces(board, track_of([240.0 + shift, 240.0 + shift], [128.0, 0.0], 64, (H, W)), progress=False)[0]
    assert abs(crop.mean() - 127.5) < 8 and crop.std() < 16, (crop.mean(), crop.std())


# ---------------------------------------------------------------- pipeline: cache keys

def test_face_track_cache_key_holds_the_fps(tmp_path):
    "The track of a file read at 5 fps is not the cached one of the same file at its own 10 fps (same count and size, other frames)."
    from ipfacediff.pipeline import IPFaceDiffPipeline, EditConfig
    from ipfacediff.video import read_video
    pipe = IPFaceDiffPipeline.tiny(0, cache_dir=tmp_path, progress=False)
    hits = []
    for fps in (None, 5.0):
        cfg = EditConfig('x', size=64, fps=fps, max_frames=2)
        frames, info = read_video(SAMPLE, fps=cfg.fps, max_frames=cfg.max_frames, progress=False)
        assert len(frames) == 2 and info.fps == (fps or 10.0)
        hits.append(pipe.face_track(frames, cfg, source=SAMPLE)[1])
    assert hits == [False, False]
    assert len(list((tmp_path / 'tracks').glob('*.npz'))) == 2

def test_inversion_cache_key_holds_the_dtype(tmp_path, monkeypatch):
    "The inversion cache key names the networks' dtype (the trajectory is kept in it): a float64 run never takes a float32 run's entry."
    import ipfacediff.pipeline as P
    from ipfacediff.pipeline import IPFaceDiffPipeline, EditConfig
    from ipfacediff.bench import sample_frames
    keys, real = [], P.cache_key
    monkeypatch.setattr(P, 'cache_key', lambda *a, **k: keys.append(k) or real(*a, **k))
    clip, fps = sample_frames(2)
    cfg = EditConfig('add glasses', size=64, steps=1, inversion_steps=1)
    p32 = IPFaceDiffPipeline.tiny(0, cache_dir=tmp_path, progress=False)
    p64 = IPFaceDiffPipeline.tiny(0, cache_dir=tmp_path, progress=False)
    p64.c.to(dtype=torch.float64)
    assert p64.c.dtype == torch.float64
    assert not p32.edit(clip, cfg, fps=fps).cache_hit
    assert p32.edit(clip, cfg, fps=fps).cache_hit                      # the cache works at all
    assert not p64.edit(clip, cfg, fps=fps).cache_hit
    assert [k['dtype'] for k in keys] == ['torch.float32'] * 2 + ['torch.float64']
    assert len(list((tmp_path / 'inversion').glob('*.pt'))) == 2


# ---------------------------------------------------------------- facedata

def test_face_dataset_crops_non_square_images_at_the_centre(tmp_path):
    "A wide and a tall image keep their centre square (where an aligned face is), not the top-left one."
    a = np.zeros((20, 60, 3), np.uint8); a[:, 20:40] = 255            # wide: white centre square, black sides
    b = np.zeros((60, 20, 3), np.uint8); b[20:40] = 255               # tall
    Image.fromarray(a).save(tmp_path / 'a.png'); Image.fromarray(b).save(tmp_path / 'b.png')
    from ipfacediff.facedata import FaceDataset
    ds = FaceDataset(tmp_path, size=20, quiet=True)
    for x in ds:
        assert x['image'].shape == (3, 20, 20) and bool((x['image'] == 1).all()), x['path']

def test_generic_caption_probability_is_generic_p():
    "EditPrompts uses the generic reference with probability generic_p: never at 0, always at 1, about a quarter at 0.25."
    from ipfacediff.facedata import EditPrompts
    table = {'attributes': [{'name': 'Eyeglasses', 'category': 'facial feature', 'targets': ['wearing eyeglasses']}],
             'generic_reference': 'a photo of a face'}
    caps = ['a man with short hair'] * 2000
    def generic_share(p):
        tar, ref = EditPrompts(table, generic_p=p).sample(caps, torch.Generator().manual_seed(0))
        assert all(r in ('a photo of a face', caps[0]) for r in ref)
        return sum(r == 'a photo of a face' for r in ref) / len(ref)
    assert generic_share(0.0) == 0 and generic_share(1.0) == 1
    assert abs(generic_share(0.25) - 0.25) < 0.03


# ---------------------------------------------------------------- ablations

def test_mean_frame_cosine_distance_pairs_frame_t_with_frame_t():
    "The per-frame identity distance compares edited frame t with source frame t: by hand, (0 + (1 − 1/√2)) / 2."
    from ipfacediff.ablations import crop_metrics
    colour = lambda *rgb: np.broadcast_to(np.array(rgb, np.uint8), (8, 8, 3))
    src = np.stack([colour(255, 0, 0), colour(255, 255, 0)])          # red, yellow
    edited = np.stack([colour(255, 0, 0), colour(0, 255, 0)])         # red (the same), green (45° from yellow)
    mean_rgb = lambda x: x.mean((2, 3))                               # embedding: the crop's mean colour
    m = crop_metrics(edited, src, mean_rgb)
    assert m['mean_frame_cosine_distance'] == pytest.approx((1 - 2 ** -0.5) / 2, abs=1e-9)
    assert crop_metrics(src, src, mean_rgb)['mean_frame_cosine_distance'] == pytest.approx(0, abs=1e-9)


# ---------------------------------------------------------------- bench

@pytest.fixture(scope='module')
def bench_row():
    "One timed tiny edit through bench_run: 4 frames, batches of 2 (2 keyframes, one group), 2 steps, made-up FLOP counts."
    from ipfacediff.bench import make_pipeline, sample_frames, bench_run
    from ipfacediff.pipeline import EditConfig
    pipe = make_pipeline('tiny', 'cpu')
    clip, fps = sample_frames(4)
    cfg = EditConfig('add glasses', size=64, steps=2, inversion_steps=2, batch_size=2, keyframe_window=None)
    flops = {'unet': 1.0, 'vae_encode': 3e3, 'vae_decode': 5e3, 'selfattn': 1e6, 'text': 0.0}
    return bench_run(pipe, clip, fps, cfg, flops, 1.0, write=False), flops, cfg

def test_bench_encode_flops_are_the_encoders(bench_row):
    "The encode stage counts N VAE-encoder evaluations (not the decoder's, 2.2× more at 512²), the decode stage N decoder ones."
    r, flops, _ = bench_row
    assert r['stages']['encode']['flops'] == 4 * flops['vae_encode']
    assert r['stages']['decode']['flops'] == 4 * flops['vae_decode']

def test_bench_edit_flops_include_keyframe_attention(bench_row):
    "The edit's FLOPs add the extended attention of the keyframes: 2 guidance rows × g(g − 1) frame pairs per step, g = 2."
    r, flops, cfg = bench_row
    st = r['stages']['edit']
    pairs = cfg.steps * 2 * 2 * (2 - 1)
    assert st['unet_evals'] > 0
    assert st['flops'] == st['unet_evals'] * flops['unet'] + pairs * flops['selfattn']

def test_bench_scaling_ratio_is_large_n_over_small_n():
    "The scaling ratio is s/frame at the larger frame count over s/frame at the smaller: > 1 when long clips cost more per frame."
    from ipfacediff.bench import _scaling
    runs = [{'frames': n, 's_per_frame': s, 'cpu_s_per_frame': s / 2} for n, s in ((16, 1.0), (64, 3.0))]
    summary = {'16': {'s_per_frame_median': 1.0}, '64': {'s_per_frame_median': 3.0}}
    sc = _scaling(runs, 16, 64, summary)
    assert sc['s_per_frame_ratio'] == pytest.approx(3.0)
    assert sc['pair_ratio_median'] == pytest.approx(3.0) and sc['cpu_pair_ratio_median'] == pytest.approx(3.0)

def test_bench_sample_clip_plays_back_and_forth():
    "The clip tiled to N frames plays forwards then backwards (ping-pong), so no frame step is larger than the clip's own: no jump cut."
    from ipfacediff.bench import sample_frames
    from ipfacediff.video import read_video
    frames, _ = read_video(SAMPLE, progress=False)
    n = len(frames)
    clip, fps = sample_frames(2 * n + 3)
    order = list(range(n)) + list(range(n - 1, -1, -1)) + [0, 1, 2]
    assert len(clip) == 2 * n + 3 and fps == 10.0
    assert all(np.array_equal(c, frames[i]) for c, i in zip(clip, order))
    step = lambda v: np.abs(np.diff(v.astype(np.int16), axis=0)).mean((1, 2, 3)).max()
    assert step(clip) <= step(frames)
