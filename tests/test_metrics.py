"`ipfacediff.metrics`: identity retrieval on real faces (dlib ResNet), warp error, TL/TG-ID, CLIP direction, timing, gallery cache, `ipfacediff evaluate`."
import json, os, re, shutil, subprocess, sys, time, warnings
from pathlib import Path
import numpy as np
import pytest, torch, cv2

os.environ.setdefault('OMP_NUM_THREADS', '1')
from ipfacediff import metrics as M
from ipfacediff.utils import UserError, data_path
from ipfacediff.video import read_video, write_video

from cli_helpers import run_cli


@pytest.fixture(scope='module')
def frames():
    return read_video(data_path('sample.mp4'), progress=False)[0]


@pytest.fixture(scope='module')
def dlib_emb():
    from ipfacediff.embedders import get_embedder
    return get_embedder('dlib')


@pytest.fixture(scope='module')
def people(frames):
    "Real faces of 7 different photos/clips: the sample clip, astronaut, Grace Hopper, Obama ×3, Biden."
    import skimage.data, matplotlib.cbook
    from PIL import Image
    from ipfacediff.embedders import fetch_face_recognition_images
    out = {'sample': frames[::5][:8], 'astronaut': skimage.data.astronaut()[None],
           'grace_hopper': np.asarray(Image.open(matplotlib.cbook.get_sample_data('grace_hopper.jpg')).convert('RGB'))[None]}
    out.update({n.removesuffix('.jpg'): np.asarray(Image.open(p).convert('RGB'))[None]
                for n, p in fetch_face_recognition_images().items()})
    return out


# ---------------------------------------------------------------- retrieval

def test_rank_of_truth_matches_sorting_and_ties_are_pessimistic():
    rng = np.random.default_rng(1)
    G, Q, t = rng.normal(size=(200, 8)), rng.normal(size=(40, 8)), rng.integers(0, 200, 40)
    d = np.linalg.norm(Q[:, None] - G[None], axis=-1)
    brute = [int(np.nonzero(np.argsort(d[i], kind='stable') == t[i])[0][0]) + 1 for i in range(40)]
    assert M.rank_of_truth(Q, G, t, metric='euclidean').tolist() == brute
    G2 = np.concatenate([G, G[:1]])                   # a duplicate of item 0 ranks it (and itself) pessimistically
    assert M.rank_of_truth(G[:1], G2, [0]).tolist() == [2]
    assert M.rank_of_truth(G[:1], G2, [200], metric='euclidean').tolist() == [2]
    r = [1, 1, 2, 5]
    assert M.recall_at_1(r) == 0.5 and abs(M.mean_reciprocal_rank(r) - (1 + 1 + .5 + .2) / 4) < 1e-12
    # a query with no face (None) is a miss that stays in the denominator
    assert M.recall_at_1(r + [None]) == 0.4 and abs(M.mean_reciprocal_rank(r + [None]) - (1 + 1 + .5 + .2) / 5) < 1e-12
    with pytest.raises(UserError, match='at least one'): M.mean_reciprocal_rank([])
    with pytest.raises(UserError, match='cosine'): M.rank_of_truth(Q, G, t, metric='l1')


def test_35k_gallery_ranks_in_seconds():
    rng = np.random.default_rng(0)
    G = rng.normal(size=(35_000, 512)).astype(np.float32)
    t = rng.integers(0, 35_000, 200)
    Q = G[t] + 0.5 * rng.normal(size=(200, 512)).astype(np.float32)
    # process CPU time on one torch thread: what the ranking costs, not how busy the shared machine is
    nt = torch.get_num_threads(); torch.set_num_threads(1)
    try:
        c0 = time.process_time(); torch.as_tensor(Q, dtype=torch.float64) @ torch.as_tensor(G, dtype=torch.float64).T
        cpu_mm = time.process_time() - c0                  # the one product any ranking has to compute
        t0, c0 = time.perf_counter(), time.process_time(); r = M.rank_of_truth(Q, G, t)
        cpu, dt = time.process_time() - c0, time.perf_counter() - t0
    finally: torch.set_num_threads(nt)
    print(f'200 queries x 35000 gallery: {cpu:.2f} s CPU ({dt:.2f} s wall), the bare product {cpu_mm:.2f} s CPU')
    assert M.recall_at_1(r) == 1.0
    assert cpu >= 0.5 * cpu_mm                              # the timed call did the work (no stale or lazy result)
    assert cpu < min(10, 8 * cpu_mm + 1)                    # and little besides: no Python loop over the gallery items


def test_cosine_distance():
    assert M.cosine_distance([1, 0], [0, 3]) == pytest.approx(1.0)
    assert M.cosine_distance(torch.tensor([2., 2.]), [1, 1]) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- identity on real faces (dlib ResNet)

def test_real_gallery_retrieval(people, dlib_emb):
    names = list(people)
    orig = {n: M.embed_frames(people[n], {'dlib': dlib_emb})['dlib'] for n in names}
    gal = np.stack([orig[n].embedding for n in names])
    # a video compared with itself
    self_r = M.rank_of_truth(gal, gal, np.arange(len(gal)), metric='euclidean')
    assert np.allclose(M.cosine_distance(gal, gal), 0, atol=1e-9)
    assert M.recall_at_1(self_r) == 1.0 and M.mean_reciprocal_rank(self_r) == 1.0
    # degraded copies find their original
    Q, T, qn = [], [], []
    for kind in ('blur', 'jpeg', 'color'):
        for i, n in enumerate(names):
            Q.append(M.embed_frames(M.degrade(people[n], kind), {'dlib': dlib_emb}, reference_boxes=orig[n].boxes)['dlib'].embedding)
            T.append(i); qn.append((n, kind))
    Q, T = np.stack(Q), np.array(T)
    for metric in ('euclidean', 'cosine'):
        r = M.rank_of_truth(Q, gal, T, metric=metric)
        print(metric, 'R@1', M.recall_at_1(r), 'MRR', M.mean_reciprocal_rank(r))
        assert M.recall_at_1(r) >= 0.9 and M.mean_reciprocal_rank(r) >= 0.9
    # a different person is not retrieved
    for q, wrong in (('biden', 'obama'), ('sample', 'astronaut'), ('obama2', 'grace_hopper'), ('astronaut', 'sample')):
        qi = qn.index((q, 'jpeg'))
        assert M.rank_of_truth(Q[qi], gal, [names.index(wrong)])[0] > 1, (q, wrong)


def test_face_crops_skips_frames_without_face_and_follows_the_reference(people):
    a = people['astronaut'][0]
    _, det, box = M.face_crops(np.stack([a, np.zeros_like(a), a]))
    assert det.tolist() == [True, False, True] and np.isnan(box[1]).all()
    blurred = cv2.GaussianBlur(a, (0, 0), 2.0)        # has a false detection larger than the face
    _, _, b_ref = M.face_crops(blurred, reference_boxes=box[:1])
    assert M._iou(b_ref[0], box[0]) > 0.7
    with pytest.raises(UserError, match='no face found'):
        M.face_crops(np.zeros((2, 80, 80, 3), np.uint8))


def test_build_gallery_uses_the_cache(tmp_path, people, dlib_emb):
    from PIL import Image
    g = tmp_path / 'gallery'; g.mkdir()
    for n in ('astronaut', 'grace_hopper'): Image.fromarray(people[n][0]).save(g / f'{n}.png')
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(g / 'blank.png')
    with pytest.warns(UserWarning, match='no face found in 1 item'):
        g1 = M.build_gallery(g, dlib_emb, cache_dir=tmp_path / 'cache', progress=False)
    assert g1.names == ['astronaut', 'grace_hopper'] and g1.skipped == ['blank'] and g1.stats.computed == 3
    calls = []
    orig = M.face_boxes                                       # the face search every embedding starts with
    M.face_boxes = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        with pytest.warns(UserWarning):
            g2 = M.build_gallery(g, dlib_emb, cache_dir=tmp_path / 'cache', progress=False)
    finally: M.face_boxes = orig
    # every item comes from the cache, the faceless one too: its 'no face' is remembered and not searched again (bd63317)
    assert g2.stats.cached == 3 and g2.stats.computed == 0 and len(calls) == 0 and g2.skipped == ['blank']
    np.testing.assert_allclose(g1.embeddings, g2.embeddings)
    with pytest.raises(UserError, match='holds no videos'):
        (tmp_path / 'empty').mkdir(); M.build_gallery(tmp_path / 'empty', dlib_emb)
    (g / 'broken.png').write_bytes(b'not an image')          # a damaged file is one item fewer, named, not a lost gallery
    with pytest.warns(UserWarning) as rec:
        g3 = M.build_gallery(g, dlib_emb, cache_dir=tmp_path / 'cache', progress=False)
    said = [str(w.message) for w in rec]
    assert any(re.match(r'gallery item broken left out: cannot read the image .*broken\.png', w) for w in said), said
    assert any('no face found in 1 item(s), left out: blank' in w for w in said), said
    assert g3.names == ['astronaut', 'grace_hopper'] and g3.skipped == ['blank', 'broken']


# ---------------------------------------------------------------- temporal

def test_flow_recovers_a_known_shift(frames):
    a = frames[10]
    b = cv2.warpAffine(a, np.float32([[1, 0, 3], [0, 1, -2]]), a.shape[1::-1], borderMode=cv2.BORDER_REFLECT)
    np.testing.assert_allclose(np.median(M.compute_flow(a, b).reshape(-1, 2), 0), [3, -2], atol=0.25)
    bw = M.compute_flow(b, a)                          # flow t+1 → t: what the backward warp of eq. 7 needs
    np.testing.assert_allclose(np.median(bw.reshape(-1, 2), 0), [-3, 2], atol=0.25)
    assert np.abs(M.warp(a, bw) - b / 255).mean() < 0.3 * np.abs(a / 255 - b / 255).mean()


def test_warp_error_static_real_shuffled(frames):
    assert M.warp_error(np.repeat(frames[:1], 4, 0)) == pytest.approx(0, abs=1e-6)
    # the whole clip against the same frames shuffled (DIS fast preset, to keep the test quick)
    real = M.warp_error(frames, flow='dis-fast')
    shuf = M.warp_error(frames[np.random.default_rng(0).permutation(len(frames))], flow='dis-fast')
    clip = frames[:8]
    plain, masked = M.warp_error(clip), M.warp_error(clip, occlusion_mask=True)
    print(f'warp error (dis-fast): real {real:.4f}, shuffled {shuf:.4f}; 8 frames (dis) {plain:.4f}, masked {masked:.4f}')
    assert real < 0.5 * shuf and masked <= plain
    with pytest.raises(UserError, match='at least 2 frames'): M.warp_error(clip[:1])


def test_raft_missing_is_a_user_error(frames):
    if M.raft_available(): pytest.skip('RAFT is available here')
    with pytest.raises(UserError, match='--flow dis'): M.warp_error(frames[:2], flow='raft')


def test_tl_tg_id():
    E = np.array([[1., 0], [1, 0], [0, 1], [0, 1]])
    assert M.tl_id(E) == pytest.approx(2 / 3) and M.tg_id(E) == pytest.approx(1 / 3)
    assert M.tl_id(E, reference=E) == pytest.approx(1) and M.tg_id(np.ones((3, 2)), reference=E) == pytest.approx(3)
    E[2] = np.nan
    assert M.tl_id(E) == pytest.approx(1) and M.tg_id(E) == pytest.approx(1 / 3)


class _ToyClip:
    "encode_image: mean RGB (centred); encode_text: fixed vectors — makes the direction score exact."
    def encode_image(self, x): return x.mean((2, 3)) - 0.5
    def encode_text(self, prompts):
        table = {'a red face': [1., 0, 0], 'a face': [0.1, 0.1, 0.1], 'a blue face': [0, 0, 1.]}
        return torch.tensor([table[p] for p in prompts])


def test_clip_direction_score_exact_with_a_toy_encoder():
    base = np.full((3, 16, 16, 3), 128, np.uint8)
    redder = base.copy(); redder[..., 0] = 200
    s_red = M.clip_direction_score(redder, base, 'a red face', 'a face', clip=_ToyClip())
    s_blue = M.clip_direction_score(redder, base, 'a blue face', 'a face', clip=_ToyClip())
    assert s_red > 0.5 and s_blue < s_red


def test_clip_direction_score_tiny_clip_and_missing_weights(frames):
    from ipfacediff.losses import tiny_clip
    small = np.stack([cv2.resize(f, (64, 64)) for f in frames[:3]])
    assert M.clip_direction_score(small, small, 'a', 'b', clip=tiny_clip(0)) == pytest.approx(0.0, abs=1e-6)
    clip, bright = tiny_clip(0), np.clip(small.astype(int) + 40, 0, 255).astype(np.uint8)
    s, per = M.clip_direction_score(bright, small, 'a bright face', 'a face', clip=clip, return_per_frame=True)
    # by hand: cos(normalise(f_I(edited)) − normalise(f_I(original)), ΔT), with ΔT = text_direction(target, source)
    from ipfacediff.losses import text_direction
    enc = lambda x: torch.nn.functional.normalize(clip.encode_image(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255), dim=-1)
    with torch.no_grad():
        d_img = torch.nn.functional.normalize(enc(bright) - enc(small), dim=-1)
        dt = text_direction(clip, 'a bright face', 'a face')[0]
    np.testing.assert_allclose(per, (d_img @ dt).numpy(), atol=1e-5)
    assert s == pytest.approx(float(per.mean()))
    # the sign: along the frame's own image direction the score is 1, against it −1, and swapping the videos flips it
    assert M.clip_direction_score(bright[:1], small[:1], 'x', 'y', clip=clip, direction=d_img[0]) == pytest.approx(1.0, abs=1e-5)
    assert M.clip_direction_score(small[:1], bright[:1], 'x', 'y', clip=clip, direction=d_img[0]) == pytest.approx(-1.0, abs=1e-5)
    with pytest.raises(UserError, match='could not load CLIP'):
        M.clip_direction_score(small, small, 'a', 'b', clip='/nonexistent/clip')


def test_evaluate_checks_settings_before_any_work(tmp_path, capsys, monkeypatch):
    "Bad numbers, a missing output parent, inputs that are not folders: one line, exit 2, no video opened, nothing written."
    from ipfacediff.cli import main
    for d, n in (('orig', 'clip'), ('edited', 'clip')):
        (tmp_path / d).mkdir(); (tmp_path / d / f'{n}.mp4').write_bytes(b'never decoded')
    opened = []
    monkeypatch.setattr(M, 'load_media', lambda *a, **k: opened.append(a))
    monkeypatch.setattr(M, 'embed_media', lambda *a, **k: opened.append(a))
    before = sorted(tmp_path.rglob('*'))
    base = {'--original': tmp_path / 'orig', '--edited': tmp_path / 'edited', '--out': tmp_path / 'rep'}
    cases = [({'--batch-size': 0}, '--batch-size must be a whole number of at least 1, got 0'),
             ({'--batch-size': -2}, 'got -2'),
             ({'--fps': 0}, '--fps must be a finite number above 0'), ({'--fps': -5}, 'got -5.0'), ({'--fps': 'nan'}, 'got nan'),
             ({'--max-frames': 0}, '--max-frames must be a whole number of at least 1, got 0'),
             ({'--out': tmp_path / 'nodir' / 'rep'}, f"the folder {tmp_path / 'nodir'} does not exist: create it first"),
             ({'--out': tmp_path / 'orig' / 'clip.mp4', '--overwrite': None}, 'is a file: give a folder path'),
             ({'--cache-dir': tmp_path / 'orig' / 'clip.mp4'}, '--cache-dir'),
             ({'--cache-dir': tmp_path / 'orig' / 'clip.mp4' / 'sub'}, 'is a file (or lies under one): give a folder with --cache-dir'),
             ({'--edited': tmp_path / 'edited' / 'clip.mp4'}, f"--edited {tmp_path / 'edited' / 'clip.mp4'} is a file: --edited must be a folder of videos"),
             ({'--original': tmp_path / 'nodir'}, f"--original {tmp_path / 'nodir'} does not exist"),
             ({'--edited': tmp_path / 'nodir'}, f"--edited {tmp_path / 'nodir'} does not exist"),
             ({'--gallery': tmp_path / 'nogallery'}, f"--gallery {tmp_path / 'nogallery'} does not exist"),
             # prompts without --clip would be ignored: refused
             ({'--prompt': 'a smiling face'}, '--prompt and --source-prompt are used only by the CLIP direction score: add --clip'),
             ({'--prompt': 'a smiling face', '--source-prompt': 'a face'}, 'add --clip'), ({'--source-prompt': 'a face'}, 'add --clip')]
    for kw, msg in cases:
        argv = ['evaluate', '--quiet']
        for k, v in {**base, **kw}.items(): argv += [k] if v is None else [k, str(v)]
        capsys.readouterr()
        assert main(argv, commands={'evaluate': ('ipfacediff.metrics', 'evaluate')}) == 2, kw
        err = capsys.readouterr().err
        assert msg in err and err.strip().count('\n') == 0, (kw, err)
    # through the API a missing gallery is found while the inputs are listed, before any original is embedded
    with pytest.raises(UserError, match='no such folder'):
        M.evaluate(tmp_path / 'orig', tmp_path / 'edited', tmp_path / 'rep', gallery=tmp_path / 'nogallery', progress=False)
    assert opened == [] and sorted(tmp_path.rglob('*')) == before


def test_stage_timer():
    t = M.StageTimer(cuda_sync=True)                  # sync is a no-op without CUDA
    for _ in range(2):
        with t('a'): time.sleep(0.01)
    with t('b'): pass
    d = t.as_dict()
    assert list(d) == ['a', 'b'] and d['a']['calls'] == 2 and d['a']['seconds'] >= 0.02
    assert '| a |' in t.table() and t.total == pytest.approx(d['a']['seconds'] + d['b']['seconds'])


# ---------------------------------------------------------------- evaluate / CLI

@pytest.fixture(scope='module')
def work(tmp_path_factory, frames, people):
    from PIL import Image
    w = tmp_path_factory.mktemp('evaluate')
    for d in ('orig', 'edited', 'bad'): (w / d).mkdir()
    clip = frames[:10]
    write_video(w / 'orig' / 'clip.mp4', clip, 10, progress=False)
    Image.fromarray(people['grace_hopper'][0]).save(w / 'orig' / 'grace_hopper.png')
    write_video(w / 'edited' / 'clip.mp4', M.degrade(M.degrade(clip, 'color', seed=3), 'blur'), 10, progress=False)
    bad = M.degrade(clip[:8], 'jpeg'); bad[3] = 0; bad[5] = 255      # 2 frames fewer, 2 frames without a face
    write_video(w / 'bad' / 'clip.mp4', bad, 10, progress=False)
    return w


def test_cli_evaluate_writes_tables_and_plots(work, capsys):
    out = work / 'report'
    r, _ = run_cli('evaluate', '--original', work / 'orig', '--edited', work / 'edited', '--out', out, '--quiet',
                   timeout=300, env={'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ['identity_distribution.png', 'identity_over_time.png', 'metrics.json',
                                                      'per_video', 'table1.md', 'table3.md']
    res = json.loads((out / 'metrics.json').read_text())
    m = res['methods']['edited']
    assert res['gallery_size'] == 2 and m['identity']['dlib']['r@1'] == 1.0 and m['identity']['dlib']['cosine_distance'] < 0.05
    assert m['warp_error'] > 0 and m['videos']['clip']['frames_without_face_edited'] == 0
    t1 = (out / 'table1.md').read_text()
    assert '| Method | dlib cos. dist. ↓ | dlib R@1 ↑ | dlib MRR ↑ |' in t1 and '| edited |' in t1
    assert 'Warp error' in (out / 'table3.md').read_text()
    rows = (out / 'per_video' / 'edited' / 'clip.csv').read_text().splitlines()
    assert rows[0].startswith('frame,face_original,face_edited,cosine_distance_dlib') and len(rows) == 11
    before = (out / 'metrics.json').read_bytes()
    from ipfacediff.cli import main                   # in-process: a second subprocess would re-import every module
    assert main(['evaluate', '--original', str(work / 'orig'), '--edited', str(work / 'edited'), '--out', str(out)],
                commands={'evaluate': ('ipfacediff.metrics', 'evaluate')}) == 2
    err = capsys.readouterr().err
    assert '--overwrite' in err and err.strip().count('\n') == 0
    assert (out / 'metrics.json').read_bytes() == before


def test_evaluate_self_is_perfect(work, people):
    from PIL import Image
    from ipfacediff.losses import tiny_clip
    (work / 'self').mkdir(exist_ok=True); shutil.copy(work / 'orig' / 'clip.mp4', work / 'self' / 'clip.mp4')
    (work / 'gal').mkdir(exist_ok=True); Image.fromarray(people['astronaut'][0]).save(work / 'gal' / 'astronaut.png')
    res = M.evaluate(work / 'orig', work / 'self', work / 'r_self', gallery=work / 'gal', cache_dir=work / 'cache',
                     clip=tiny_clip(0), prompt='a smiling face', source_prompt='a face', progress=False)
    v = res['methods']['self']
    assert res['gallery_size'] == 3 and res['embeddings']['computed'] == 4       # clip, grace_hopper, astronaut, the "edit"
    assert v['identity']['dlib']['cosine_distance'] == pytest.approx(0, abs=1e-9)
    assert v['identity']['dlib']['r@1'] == 1.0 and v['identity']['dlib']['mrr'] == 1.0
    assert v['tl_id'] == pytest.approx(1) and v['warp_error'] == pytest.approx(v['warp_error_original'])
    assert v['clip_direction'] == pytest.approx(0, abs=1e-6)                     # no change, no direction
    assert 'CLIP direction' in (work / 'r_self' / 'table3.md').read_text()


def test_gallery_copies_of_the_originals_are_left_out(work, people):
    from PIL import Image
    (work / 'self').mkdir(exist_ok=True); shutil.copy(work / 'orig' / 'clip.mp4', work / 'self' / 'clip.mp4')
    g = work / 'gal_with_copies'; g.mkdir(exist_ok=True)
    Image.fromarray(people['astronaut'][0]).save(g / 'astronaut.png')
    shutil.copy(work / 'orig' / 'clip.mp4', g / 'celebv_0001.mp4')          # the test videos are also in the collection
    shutil.copy(work / 'orig' / 'grace_hopper.png', g / 'celebv_0002.png')
    with pytest.warns(UserWarning, match='2 gallery item.s. are byte-for-byte copies of originals'):
        res = M.evaluate(work / 'orig', work / 'self', work / 'r_copies', gallery=g, cache_dir=work / 'cache', progress=False)
    assert res['gallery_size'] == 3                                            # clip, grace_hopper, astronaut: each once
    assert res['methods']['self']['identity']['dlib']['r@1'] == 1.0             # a copy would tie and make it rank 2
    assert any('copies of originals' in w for w in res['warnings'])


def test_an_edit_without_any_face_is_a_miss_not_a_crash(work, frames):
    d = work / 'destroyed'; d.mkdir(exist_ok=True)
    write_video(d / 'clip.mp4', np.full_like(frames[:10], 128), 10, progress=False)     # the edit wiped the face out
    shutil.copy(work / 'orig' / 'grace_hopper.png', d / 'grace_hopper.png')            # this one kept it
    with pytest.warns(UserWarning, match='no face found in any of the 10 edited frames'):
        res = M.evaluate(work / 'orig', d, work / 'r_destroyed', progress=False)
    m = res['methods']['destroyed']
    assert m['n_no_face'] == 1 and m['n_videos'] == 2
    clip, grace = m['videos']['clip'], m['videos']['grace_hopper']
    assert clip['face_found'] is False and clip['identity']['dlib']['rank'] is None and clip['identity']['dlib']['cosine_distance'] is None
    assert grace['identity']['dlib']['rank'] == 1
    assert m['identity']['dlib']['r@1'] == 0.5 and m['identity']['dlib']['mrr'] == 0.5       # 2 queries, 1 hit, 1 miss
    assert m['identity']['dlib']['cosine_distance'] == pytest.approx(grace['identity']['dlib']['cosine_distance'])
    assert clip['tl_id'] is None and clip['warp_error'] is not None and grace['warp_error'] is None   # a still has no frame pairs
    t1 = (work / 'r_destroyed' / 'table1.md').read_text()
    assert 'destroyed: 1 of 2' in t1 and 'counts as a miss' in t1


def test_evaluate_bad_input(work):
    with pytest.warns(UserWarning) as rec:
        res = M.evaluate(work / 'orig', work / 'bad', work / 'r_bad', progress=False)
    msgs = ' '.join(str(w.message) for w in rec)
    v = res['methods']['bad']['videos']['clip']
    assert v['n_frames_edited'] == 8 and v['n_frames_compared'] == 8 and 'truncated' in msgs
    assert v['frames_without_face_edited'] == 2 and 'no face found in 2 of 8' in msgs
    assert any('truncated' in w for w in res['warnings'])
    rows = (work / 'r_bad' / 'per_video' / 'bad' / 'clip.csv').read_text().splitlines()
    assert rows[4].split(',')[2] == '0' and rows[4].split(',')[3] == ''      # frame 3: no face, no distance
    from ipfacediff.cli import main
    (work / 'empty').mkdir(exist_ok=True); (work / 'other').mkdir(exist_ok=True)
    shutil.copy(work / 'orig' / 'clip.mp4', work / 'other' / 'someone.mp4')
    for edited, msg in (('empty', 'holds no videos'), ('other', 'no original of the same name'), ('missing', 'no such folder')):
        with pytest.raises(UserError, match=msg): M.evaluate(work / 'orig', work / edited, work / 'r2', progress=False)
    with pytest.raises(UserError, match='unknown face embedder'):
        M.evaluate(work / 'orig', work / 'edited', work / 'r2', recognizers='sphereface', progress=False)
    assert main(['evaluate', '--original', str(work / 'orig'), '--edited', str(work / 'other'), '--out', str(work / 'r2')],
                commands={'evaluate': ('ipfacediff.metrics', 'evaluate')}) == 2
    assert not (work / 'r2').exists() and not list(work.glob('.r2*'))


# ---------------------------------------------------------------- review fixes: sizes, rates, cache key, CLIP path, TL/TG-ID, prompts

@pytest.fixture(scope='module')
def small(tmp_path_factory, frames):
    "6 frames of the sample clip at 320x180 (a ~130 px face), 10 fps, as the one original."
    w = tmp_path_factory.mktemp('evaluate_small')
    (w / 'orig').mkdir()
    clip = np.stack([cv2.resize(f, (320, 180), interpolation=cv2.INTER_AREA) for f in frames[:6]])
    write_video(w / 'orig' / 'clip.mp4', clip, 10, progress=False)
    return w, M.load_media(w / 'orig' / 'clip.mp4')


def test_an_edit_at_another_size_is_scored_and_the_clip_path_is_shared(small, monkeypatch):
    "An edit at 1.5x the original's size finds its face (reference boxes scaled); the original's CLIP crops and the text direction are computed once."
    from ipfacediff import losses
    from ipfacediff.losses import tiny_clip
    w, of = small
    edit = M.degrade(of, 'color', seed=3)
    for m, e in (('scaled', np.stack([cv2.resize(f, (480, 270), interpolation=cv2.INTER_CUBIC) for f in edit])), ('same_size', edit)):
        (w / m).mkdir(); write_video(w / m / 'clip.mp4', e, 10, progress=False)
    calls, real_fc, real_fb, real_td = [], M.face_crops, M.face_boxes, losses.text_direction
    def counted(fr, reference_boxes=None, progress=False):
        calls.append(('crops', len(fr), reference_boxes is None)); return real_fb(fr, reference_boxes, progress)
    monkeypatch.setattr(M, 'face_boxes', counted)
    monkeypatch.setattr(losses, 'text_direction', lambda *a, **k: calls.append(('text',)) or real_td(*a, **k))
    clip = tiny_clip(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        res = M.evaluate(w / 'orig', [w / 'scaled', w / 'same_size'], w / 'r_sizes', clip=clip, prompt='a smiling face',
                         source_prompt='a face', progress=False)
    msgs = [str(c.message) for c in caught]
    v = res['methods']['scaled']['videos']['clip']
    assert v['size_edited'] == [270, 480] and v['size_original'] == [180, 320]
    assert v['face_found'] is True and v['frames_without_face_edited'] == 0, msgs        # was: no face (original-pixel boxes)
    assert v['identity']['dlib']['cosine_distance'] < 0.05 and v['identity']['dlib']['rank'] == 1
    assert v['clip_direction'] is not None and v['tl_id'] is not None
    assert not any('no face' in s for s in msgs), msgs
    # faces found once per video, for the identity metrics; CLIP reuses their boxes (no second detection); the text direction once
    assert sum(c == ('text',) for c in calls) == 1
    assert sum(c[0] == 'crops' and c[2] for c in calls) == 1, calls            # the original (was 2: identity, then CLIP)
    assert sum(c[0] == 'crops' and not c[2] for c in calls) == 2, calls        # each edit, near the original's faces (was 4)
    # the same numbers as the old per-pair path: fresh crops and a fresh text direction for every (method, video)
    monkeypatch.setattr(M, 'face_boxes', real_fb)
    co, do, bo = real_fc(of)
    for m in ('scaled', 'same_size'):
        ef = M.load_media(w / m / 'clip.mp4')
        s = np.array([ef.shape[2] / of.shape[2], ef.shape[1] / of.shape[1]] * 2)
        ce, de, _ = real_fc(ef, reference_boxes=bo * s)
        idx = np.flatnonzero(de & do)
        old = M.clip_direction_score(ce[(np.cumsum(de) - 1)[idx]], co[(np.cumsum(do) - 1)[idx]], 'a smiling face', 'a face', clip)
        assert res['methods'][m]['videos']['clip']['clip_direction'] == pytest.approx(old, rel=1e-12, abs=1e-12), m


def test_edits_at_another_frame_rate_are_refused_before_any_work(small, monkeypatch, capsys):
    from ipfacediff.cli import main
    w, of = small
    (w / 'fps5').mkdir(); write_video(w / 'fps5' / 'clip.mp4', of[::2], 5, progress=False)    # an edit made with --fps 5
    assert M.load_media(w / 'fps5' / 'clip.mp4', return_fps=True)[1] == 5 and M.load_media(w / 'orig' / 'clip.mp4', return_fps=True)[1] == 10
    assert M.load_media(w / 'orig' / 'clip.mp4', fps=5, return_fps=True)[1] == 5
    embedded = []
    monkeypatch.setattr(M, 'embed_media', lambda *a, **k: embedded.append(a))
    with pytest.raises(UserError, match=r'fps5/clip: the edit runs at 5 fps, the original at 10 fps: pass --fps'):
        M.evaluate(w / 'orig', w / 'fps5', w / 'r_fps', progress=False)
    capsys.readouterr()
    assert main(['evaluate', '--quiet', '--original', str(w / 'orig'), '--edited', str(w / 'fps5'), '--out', str(w / 'r_fps')],
                commands={'evaluate': ('ipfacediff.metrics', 'evaluate')}) == 2
    err = capsys.readouterr().err
    assert '--fps' in err and err.strip().count('\n') == 0, err
    assert embedded == [] and not (w / 'r_fps').exists()
    monkeypatch.undo()                                       # with --fps both are read at that rate and pair up
    with pytest.warns(UserWarning, match='trivially 1'):
        v = M.evaluate(w / 'orig', w / 'fps5', w / 'r_fps', fps=5, progress=False)['methods']['fps5']['videos']['clip']
    assert (v['fps_original'], v['fps_edited'], v['n_frames_original'], v['n_frames_edited']) == (5, 5, 3, 3)
    assert v['identity']['dlib']['mean_frame_cosine_distance'] < 0.01


def test_tg_id_is_kept_when_tl_id_has_no_adjacent_pair(small):
    "Faces in frames 0, 2, 4 only: no two adjacent frames for TL-ID, three frames for TG-ID."
    w, of = small
    e = of.copy(); e[1::2] = 128
    (w / 'gappy').mkdir(); write_video(w / 'gappy' / 'clip.mp4', e, 10, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always'); res = M.evaluate(w / 'orig', w / 'gappy', w / 'r_gappy', progress=False)
    assert any('no face found in 3 of 6' in str(c.message) for c in caught)
    v = res['methods']['gappy']['videos']['clip']
    assert v['tl_id'] is None and v['tg_id'] == pytest.approx(1, abs=0.05)        # was: both None
    assert any('TL-ID left blank (—) because TL-ID needs two adjacent frames with a face' in str(c.message) for c in caught)
    assert not any('TG-ID left blank' in str(c.message) for c in caught)
    assert 'no video of that method had the frames it needs' in (w / 'r_gappy' / 'table3.md').read_text()   # says why the — is there
    assert res['methods']['gappy']['tg_id'] == pytest.approx(v['tg_id'])


def test_the_embedding_cache_key_follows_the_face_detector(tmp_path, monkeypatch):
    "A cached 'no face' is not reused once `faces.tracker_id()` (the detector's rules) changes."
    from ipfacediff import faces
    img = tmp_path / 'wall.png'; cv2.imwrite(str(img), np.full((96, 96, 3), 128, np.uint8))
    searched, det = [], faces.detect_all
    monkeypatch.setattr(faces, 'detect_all', lambda *a, **k: searched.append(1) or det(*a, **k))
    emb = {'any': torch.nn.Identity()}
    for i in range(2):
        with pytest.raises(UserError, match='no face'): M.embed_media(img, emb, tmp_path / 'cache')
    assert len(searched) == 1                                  # the second call read the cached "no face"
    monkeypatch.setattr(faces, 'tracker_id', lambda: 'dlib 0.0, 0 B landmark model, tracking rules 3')   # the detector changed
    with pytest.raises(UserError, match='no face'): M.embed_media(img, emb, tmp_path / 'cache')
    assert len(searched) == 2 and len(list((tmp_path / 'cache').glob('*.npz'))) == 2


def test_face_crops_does_not_take_a_bystander(frames):
    "Without a reference, face_crops picks the face the tracker follows: where the subject is missed, a smaller bystander is not taken."
    from shared import two_faces
    scene = np.stack([two_faces(frames[i], hide=i == 1) for i in range(4)])
    crops, det, boxes = M.face_crops(scene)
    assert det.tolist() == [True, False, True, True] and len(crops) == 3
    assert (boxes[det, 2] < 640).all()                       # the subject's box wherever a face is taken
