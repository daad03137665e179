"""Mutation review of `ipfacediff.metrics` (retrieval, eq. 7, TL/TG-ID, timing, inputs and caches): behaviour that
nbs/10_metrics.ipynb and the other test files let through. What these tests pin, each against an answer worked out by hand or
a property of real data: `retrieval_metrics` ranks by the metric it is given (a 3×3 gallery); ties are found within a
*relative* 1e-9 — euclidean at any embedding scale, cosine at any query length — and ranks stay 1-based with `tie_tol=0`;
a truth index one past the gallery is a `ValueError`; the §5.3 video embedding is the mean of the frame embeddings;
float frames in [0, 1] give the flow and the warp error of their uint8 frames; 'dis-fast' is another preset than 'dis';
eq. 7 is the mean (not median) over the pairs; TG-ID of one face is a `UserError`; `StageTimer.add` counts the calls it
is given; a colour jitter offsets as well as scales; `list_media` takes CLIP.MP4; `load_media` honours `max_frames` on an
image folder; a folder's hash covers its frame names; a gallery counts frames read and frames with a face apart;
`dlib,dlib=PATH` is two recognizers; a recognizer's cache key follows its own `fingerprint()` (its crop, not only its
weights). Each test's docstring names the mutants it kills. Real dlib ResNet, data/sample.mp4, real files, CPU."""
import os
import numpy as np, pytest, cv2

os.environ.setdefault('OMP_NUM_THREADS', '1')
from ipfacediff import metrics as M
from ipfacediff.utils import UserError, data_path
from ipfacediff.video import read_video

from shared import one_line_error


@pytest.fixture(scope='module')
def frames():
    "The sample clip's first 12 frames."
    return read_video(data_path('sample.mp4'), max_frames=12, progress=False)[0]


def _shift(a, dx, dy):
    "`a` moved by (dx, dy) pixels (content at p goes to p + (dx, dy)), borders reflected."
    return cv2.warpAffine(a, np.float32([[1, 0, dx], [0, 1, dy]]), a.shape[1::-1], borderMode=cv2.BORDER_REFLECT)


# ---------------------------------------------------------------- retrieval

def test_retrieval_metrics_ranks_by_the_metric_it_is_given():
    """Kills M24 (`retrieval_metrics` drops its `metric`, always cosine). A 3×3 gallery worked out by hand:
    g = (10, 0), (0.5, 0.5), (0, 3); queries (1, 0) → 0, (0.4, 0.6) → 1, (0, 1) → 2. By angle every query's truth is the
    nearest (ranks 1, 1, 1); by distance (1, 0) is 9 from its truth but 0.71 and 3.16 from the others (rank 3), (0, 1) is 2
    from its truth but 0.71 from (0.5, 0.5) (rank 2)."""
    G = np.array([[10., 0], [0.5, 0.5], [0, 3]]); Q = np.array([[1., 0], [0.4, 0.6], [0, 1]]); t = [0, 1, 2]
    assert M.retrieval_metrics(Q, G, t, metric='cosine') == {'r@1': 1.0, 'mrr': 1.0, 'ranks': [1, 1, 1]}
    e = M.retrieval_metrics(Q, G, t, metric='euclidean')
    assert e['ranks'] == [3, 1, 2] and e['r@1'] == pytest.approx(1 / 3) and e['mrr'] == pytest.approx((1 / 3 + 1 + 1 / 2) / 3)


def test_euclidean_ties_are_pessimistic_at_any_scale():
    """Kills M19 (euclidean tie tolerance absolute, not relative to ‖q‖² + max ‖g‖²). Gallery items q + d and q + reversed(d)
    are exactly as far from q (the same coordinates, permuted), so the truth ranks 2nd (ties pessimistic). With embeddings
    of norm ~3000 the two scores differ by rounding only — far more than 1e-9 in absolute terms."""
    rng = np.random.default_rng(0)
    Q, D = rng.normal(size=(64, 8)) * 1000, rng.normal(size=(64, 8)) * 1000
    for q, d in zip(Q, D):
        G = np.stack([q + d, q + d[::-1]])
        assert M.rank_of_truth(q, G, [0], metric='euclidean').tolist() == [2]
        assert M.rank_of_truth(q, G, [1], metric='euclidean').tolist() == [2]


def test_cosine_ranks_do_not_depend_on_the_query_length():
    """Kills M17 (cosine ranking without normalising the queries: the order is kept but the tie tolerance is then scaled
    by ‖q‖). Gallery (1, 0) and (1, 1e-5) have cosine similarities to (1, 0) of 1 and 1 − 5e-11: a tie within the relative
    1e-9, so either truth ranks 2nd (pessimistic) — for the query (1, 0) at any length."""
    G = np.array([[1., 0], [1, 1e-5]])
    for k in (1e-3, 1., 1e3, 1e6):
        assert M.rank_of_truth(np.array([k, 0.]), G, [0]).tolist() == [2], k
        assert M.rank_of_truth(np.array([k, 0.]), G, [1]).tolist() == [2], k


def test_ranks_stay_1_based_without_a_tie_tolerance():
    """Kills M14 (`s >= st − tol` written `s > st − tol`: the same while tol > 0, but with `tie_tol=0` the truth no longer
    counts itself and a perfect match ranks 0). The 3×3 gallery above: with no tolerance the ranks are those worked out."""
    G = np.array([[10., 0], [0.5, 0.5], [0, 3]]); Q = np.array([[1., 0], [0.4, 0.6], [0, 1]])
    assert M.rank_of_truth(G, G, [0, 1, 2], tie_tol=0).tolist() == [1, 1, 1]
    assert M.rank_of_truth(Q, G, [0, 1, 2], metric='euclidean', tie_tol=0).tolist() == [3, 1, 2]
    assert M.rank_of_truth(Q, G, [0, 1, 2], metric='cosine', tie_tol=0).tolist() == [1, 1, 1]


def test_a_truth_index_past_the_gallery_is_a_value_error():
    """Kills M20 (`t >= len(g)` checked as `t > len(g)`: index G reaches `gather` and fails with torch's RuntimeError)."""
    G = np.eye(3)
    with pytest.raises(ValueError, match=r'truth indices must lie in \[0, 3\)'): M.rank_of_truth(G[:1], G, [3])
    with pytest.raises(ValueError, match='truth indices'): M.rank_of_truth(G[:1], G, [-1])


# ---------------------------------------------------------------- identity embeddings

def test_video_embedding_is_the_mean_of_the_frame_embeddings(frames):
    """Kills M12 (video embedding = sum of the frame embeddings): three copies of one aligned crop have that crop's
    own embedding as their video embedding (§5.3: the mean), real dlib ResNet."""
    from ipfacediff.embedders import get_embedder
    emb = get_embedder('dlib')
    det, boxes = M.face_boxes(frames[:1])
    crop = M.crops_at(frames[:1], boxes, 150)
    one = M.frame_embeddings(crop, emb)[0]
    np.testing.assert_allclose(M.video_embedding(np.repeat(crop, 3, 0), emb), one, rtol=0, atol=1e-5)   # float32 batch round-off


# ---------------------------------------------------------------- flow, warp, mask, eq. 7

def test_float_frames_give_the_flow_and_warp_error_of_their_uint8_frames(frames):
    """Kills M25 (`_gray` of float frames clipped to [0, 255] and cast: a [0, 1] frame becomes 0/1 grey levels) and M34
    (the current frame divided by 255 whatever its dtype). Float frames = uint8 frames / 255: the same flow, bit for bit,
    and the same warp error; a static float clip has warp error 0."""
    a, b = frames[0], frames[4]
    np.testing.assert_array_equal(M.compute_flow(a / 255, b / 255), M.compute_flow(a, b))
    f = frames[:3]
    assert M.warp_error(f.astype(np.float32) / 255) == pytest.approx(M.warp_error(f), abs=1e-6)
    assert M.warp_error(np.repeat(f[:1].astype(np.float32) / 255, 3, 0)) == pytest.approx(0, abs=1e-7)


def test_dis_fast_is_another_preset_than_dis(frames):
    """Kills M26 ('dis-fast' computed with DIS's medium preset, i.e. the same as 'dis'). Both recover a known shift of
    (3, −2) px; their fields are not the same."""
    a = frames[5]; b = _shift(a, 3, -2)
    fast, med = M.compute_flow(a, b, 'dis-fast'), M.compute_flow(a, b, 'dis')
    for f in (fast, med): np.testing.assert_allclose(np.median(f.reshape(-1, 2), 0), [3, -2], atol=0.3)
    assert not np.array_equal(fast, med)


def test_warp_error_is_the_mean_over_the_pairs(frames):
    """Kills M35 (the pairs' median instead of their mean). Frames a, a, a, a moved by (3, −2): the first two pairs are
    static (error 0, exactly), so eq. 7's mean is the third pair's error / 3 — the median would be 0."""
    a = frames[6]
    e, per = M.warp_error(np.stack([a, a, a, _shift(a, 3, -2)]), return_per_frame=True)
    assert per[0] == 0 and per[1] == 0 and per[2] > 0.001
    assert e == pytest.approx(per[2] / 3, rel=1e-12)


# ---------------------------------------------------------------- TL-ID / TG-ID

def test_tg_id_of_a_single_face_is_a_user_error():
    """Kills M42 (TG-ID accepts one face: the mean over no pairs is NaN with a RuntimeWarning, not the `UserError` that
    says why). One frame with a face, one without: no pair of faces."""
    one_line_error(lambda: M.tg_id(np.array([[1., 0], [np.nan, np.nan]])), 'at least two frames with a face')
    one_line_error(lambda: M.tg_id(np.array([[1., 0]])), 'at least two frames with a face')


# ---------------------------------------------------------------- timing

def test_stage_timer_add_counts_the_calls_it_is_given():
    """Kills M45 (`add` counts one call whatever `calls` says): 3 calls measured elsewhere, then 1, are 4 calls of 1 s each."""
    t = M.StageTimer()
    t.add('decode', 3.0, calls=3); t.add('decode', 1.0, calls=1); t.add('flow', 4.0)
    assert t.as_dict() == {'decode': {'seconds': 4.0, 'calls': 4, 'mean_s': 1.0}, 'flow': {'seconds': 4.0, 'calls': 1, 'mean_s': 4.0}}
    assert '| decode | 4.000 | 4 | 1.0000 | 50.0% |' in t.table()


# ---------------------------------------------------------------- inputs: image folders, hashes, galleries

def _frame_folder(folder, frames, names):
    "Write `frames` as PNGs named `names` into `folder`; return it."
    from PIL import Image
    folder.mkdir(parents=True)
    for f, n in zip(frames, names): Image.fromarray(f).save(folder / n)
    return folder


def test_load_media_reads_at_most_max_frames_of_an_image_folder(tmp_path, frames):
    """Kills M49 (`max_frames` ignored for a folder of images): 3 frames read with max_frames=2 are the first 2."""
    d = _frame_folder(tmp_path / 'seq', frames[:3], ['1.png', '2.png', '3.png'])
    got = M.load_media(d, max_frames=2)
    assert got.shape == (2, *frames.shape[1:]) and np.array_equal(got, frames[:2])
    assert len(M.load_media(d)) == 3


def test_list_media_takes_upper_case_extensions(tmp_path, frames):
    """Kills M58 (video/image suffixes matched case-sensitively: CLIP.MP4 and FACE.PNG left out as unknown files)."""
    from PIL import Image
    from ipfacediff.video import write_video
    write_video(tmp_path / 'CLIP.MP4', frames[:2, :64, :64], 10, progress=False)
    Image.fromarray(frames[0, :64, :64]).save(tmp_path / 'FACE.PNG')
    assert M.list_media(tmp_path) == {'CLIP': tmp_path / 'CLIP.MP4', 'FACE': tmp_path / 'FACE.PNG'}


def test_content_hash_of_a_folder_covers_its_frame_names(tmp_path, frames):
    """Kills M48 (a folder's hash of its images' bytes only): the same two images, in the same order, named 1.png, 2.png in
    one folder and a.png, b.png in another, are two different folders (docstring: names and bytes)."""
    small = frames[:2, :32, :32]
    a = _frame_folder(tmp_path / 'a', small, ['1.png', '2.png']); b = _frame_folder(tmp_path / 'b', small, ['a.png', 'b.png'])
    assert M.content_hash(a) != M.content_hash(b)
    c = _frame_folder(tmp_path / 'c', small, ['1.png', '2.png'])
    assert M.content_hash(a) == M.content_hash(c)


def test_gallery_counts_frames_read_and_frames_with_a_face(tmp_path, frames):
    """Kills M52 (`Gallery.n_frames` filled with the frames with a face). A 3-frame image folder whose middle frame is
    blank grey: 3 frames read, 2 with a face (real dlib)."""
    from ipfacediff.embedders import get_embedder
    f = frames[:3].copy(); f[1] = 128
    _frame_folder(tmp_path / 'g' / 'woman', f, ['1.png', '2.png', '3.png'])
    g = M.build_gallery(tmp_path / 'g', get_embedder('dlib'), progress=False)
    assert g.names == ['woman'] and g.n_frames.tolist() == [3] and g.n_faces.tolist() == [2]


def test_two_weights_of_one_recognizer_are_two_recognizers():
    """Kills M54 (`_parse_recognizers` keys 'NAME=PATH' by NAME: `--recognizers dlib,dlib=PATH` silently keeps one). The real
    dlib weights file given explicitly next to the default: both are scored, each under its own spec."""
    from ipfacediff.embedders import DLIB_DAT, _frm_dir
    w = _frm_dir() / DLIB_DAT
    got = M._parse_recognizers(f' dlib , dlib={w} ')
    assert list(got) == ['dlib', f'dlib={w}'] and all(type(e).__name__ == 'DlibEmbedder' for e in got.values())


def test_colour_jitter_shifts_as_well_as_scales():
    """Kills M53 (`degrade(..., 'color')` with gain only: a black frame stays black). Colour jitter moves each channel by
    an offset in [−20, 20] as well: over seeds 0–4 a black frame gets some channel above 0, never above 20."""
    black = np.zeros((1, 4, 4, 3), np.uint8)
    outs = [M.degrade(black, 'color', seed=s) for s in range(5)]
    assert max(o.max() for o in outs) > 0 and max(o.max() for o in outs) <= 20
    assert all((o == o[0, 0, 0]).all() for o in outs)       # one offset per channel, the same at every pixel


def test_a_recognizer_with_another_crop_is_cached_under_another_key():
    """Kills M57 (`embedder_fingerprint` ignores an embedder's own `fingerprint()` and hashes class and weights only): two
    real dlib ResNets with the same weights but another face crop give other vectors, so their cached embeddings must
    not be shared — their fingerprints and embedding cache files differ."""
    from ipfacediff.embedders import AlignedCrop, DlibEmbedder
    a, b = DlibEmbedder(), DlibEmbedder(crop=AlignedCrop(150, 2.0, (255.5, 309.3)))
    assert M.embedder_fingerprint(a) != M.embedder_fingerprint(b)
    keys = M._embedding_keys('/c', 'digest', {'x': a}, None, None, 512, None), M._embedding_keys('/c', 'digest', {'x': b}, None, None, 512, None)
    assert keys[0]['x'] != keys[1]['x']
