"""Invariants of the metrics (ipfacediff.metrics) and of `ipfacediff finetune`'s CLI paths that no other test pinned down
(mutation review): cosine distance's full range, ranking past one chunk of queries, eq. 7's mean and its `flow_frames`,
what `evaluate` (API and CLI) puts in metrics.json, the tables and the per-video CSVs, and the finetune CLI's refusals,
option plumbing, final checkpoint, resume point and --overwrite. Each answer is known by construction: embeddings
whose ranks are fixed, flat frames whose warp error is exact, darker copies of one face that cosine and Euclidean
ranking order differently. A mean-colour stand-in recogniser and tiny random SD/CLIP models keep it offline on one core."""
import csv, json, os, shutil
os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
from pathlib import Path

import cv2, numpy as np, pytest, torch
from PIL import Image

from shared import one_line_error
from ipfacediff import metrics as M
from ipfacediff.cli import build_parser, main
from ipfacediff.finetune import Finetuner, _checkpoints, config_from_args, read_log

torch.set_num_threads(1)


# ================================================================ metrics: identity

def test_cosine_distance_spans_zero_to_two():
    "d_cos = 1 − cos: opposite embeddings are at distance 2 (not clipped to 1), orthogonal at 1, equal at 0."
    assert M.cosine_distance([1., 0], [-3., 0]) == pytest.approx(2.0)
    np.testing.assert_allclose(M.cosine_distance(np.array([[1., 1], [1, 0], [0, 2]]), np.array([[-1., -1], [0, 1], [0, 5]])),
                               [2.0, 1.0, 0.0], atol=1e-12)


def test_ranks_are_right_past_the_first_chunk_of_queries():
    "600 queries (more than one chunk of 256), each a near copy of a different gallery item: every one ranks its own item first."
    rng = np.random.default_rng(0)
    G = rng.normal(size=(700, 16))
    t = rng.permutation(700)[:600]
    Q = G[t] + 1e-3 * rng.normal(size=(600, 16))
    for metric in ('cosine', 'euclidean'):
        assert M.rank_of_truth(Q, G, t, metric=metric).tolist() == [1] * 600, metric
    # and a truth that is the farthest item is ranked last, in the last chunk too
    far = np.argmax(np.linalg.norm(Q[:, None] - G[None], axis=-1), 1)
    assert M.rank_of_truth(Q, G, far, metric='euclidean').tolist() == [700] * 600


# ================================================================ metrics: warp error (eq. 7)

def test_warp_error_is_the_mean_over_the_t_minus_1_pairs():
    "Flat frames 100, 100, 151: the pairs' errors are exactly 0 and 51/255 (any flow warps a flat frame to itself); the mean is over the 2 pairs."
    f = np.stack([np.full((24, 32, 3), v, np.uint8) for v in (100, 100, 151)])
    e, per = M.warp_error(f, return_per_frame=True)
    np.testing.assert_allclose(per, [0, 51 / 255], atol=1e-6)
    assert e == pytest.approx(51 / 255 / 2, abs=1e-6)


def _texture(h, w, seed):
    n = cv2.GaussianBlur(np.random.default_rng(seed).random((h, w, 3)).astype(np.float32), (0, 0), 2.5)
    return np.clip((n - n.min()) / (n.max() - n.min()) * 255, 0, 255).astype(np.uint8)


def test_warp_error_applies_the_flow_of_flow_frames():
    "A static 'edit' scored with the flow of a moving original: the warp moves the edit by that flow, so the error is that of the moved frame, not 0."
    a = _texture(48, 64, 1)
    b = np.roll(a, 5, axis=1)                                       # the original moves 5 px right
    static = np.stack([a, a])
    assert M.warp_error(static) == pytest.approx(0, abs=1e-4)       # its own flow: nothing moves
    bw = M.compute_flow(b, a)                                       # what warp_error computes on the original (t+1 → t)
    want = float(np.abs(M.warp(a, bw) - a / 255).mean())
    got = M.warp_error(static, flow_frames=np.stack([a, b]))
    assert got == pytest.approx(want, rel=1e-6) and got > 0.05


# ================================================================ metrics: evaluate (API)

class _MeanColour(torch.nn.Module):
    "A stand-in recogniser: the mean colour of the aligned crop (deterministic; a uniformly darker face has the same direction)."
    name = 'mc'
    def forward(self, x): return x.mean((2, 3))


def _tint(img, rgb): return np.clip(img * np.asarray(rgb), 0, 255).astype(np.uint8)


@pytest.fixture(scope='module')
def ev(tmp_path_factory):
    """Originals: `A` (3 identical astronaut frames, a folder of images) and `B` (the astronaut with its blue lowered, a still).
    Edits: `A` darker (×0.5), its 2nd frame with much less green, its 3rd that frame moved 8 px right; `B` = the astronaut ×0.5.
    Under cosine ranking (scale-free) each edit is nearest the astronaut `A`: A ranks 1, B ranks 2; under Euclidean ranking
    both darker edits are nearer `B` (the shorter vector, its blue lowered): A ranks 2, B ranks 1. Scored with farneback flow and the occlusion mask."""
    import skimage.data
    w = tmp_path_factory.mktemp('ev')
    a = skimage.data.astronaut()
    for d in ('orig/A', 'ed/A'): (w / d).mkdir(parents=True)
    for i in range(3): Image.fromarray(a).save(w / 'orig' / 'A' / f'{i}.png')
    Image.fromarray(_tint(a, (1, 1, 0.6))).save(w / 'orig' / 'B.png')
    e1 = _tint(a, (0.5, 0.3, 0.5))
    e2 = np.zeros_like(e1); e2[:, 8:] = e1[:, :-8]
    for i, f in enumerate((_tint(a, (0.5, 0.5, 0.5)), e1, e2)): Image.fromarray(f).save(w / 'ed' / 'A' / f'{i}.png')
    Image.fromarray(_tint(a, (0.5, 0.5, 0.5))).save(w / 'ed' / 'B.png')
    kw = dict(recognizers={'mc': _MeanColour()}, flow='farneback', occlusion_mask=True, cache_dir=w / 'cache', progress=False)
    res = {m: M.evaluate(w / 'orig', w / 'ed', w / f'rep_{m}', rank_metric=m, **kw) for m in ('cosine', 'euclidean')}
    return w, res


def test_evaluate_ranks_by_the_metric_asked_for(ev):
    "--rank-metric reaches the ranking: per-video ranks follow the construction for cosine and for Euclidean."
    _, res = ev
    for metric, want in (('cosine', {'A': 1, 'B': 2}), ('euclidean', {'A': 2, 'B': 1})):
        vids = res[metric]['methods']['ed']['videos']
        assert {n: v['identity']['mc']['rank'] for n, v in vids.items()} == want, metric
        ident = res[metric]['methods']['ed']['identity']['mc']
        assert (ident['r@1'], ident['mrr']) == (0.5, 0.75) and res[metric]['settings']['rank_metric'] == metric


def _frames(folder): return M.load_media(folder)


def test_evaluate_identity_distance_is_of_the_mean_embeddings(ev):
    "§5.3: a video's cosine distance is between the means of its frames' embeddings (not the mean of per-frame distances); a method's is the mean over its videos."
    w, res = ev
    m = res['cosine']['methods']['ed']
    emb = lambda f: M.embed_frames(f, {'mc': _MeanColour()})['mc'].frames
    eA, oA = emb(_frames(w / 'ed' / 'A')), emb(_frames(w / 'orig' / 'A'))
    vA = m['videos']['A']['identity']['mc']
    assert vA['cosine_distance'] == pytest.approx(M.cosine_distance(eA.mean(0), oA.mean(0)), rel=1e-6)
    assert vA['mean_frame_cosine_distance'] == pytest.approx(M.cosine_distance(eA, oA).mean(), rel=1e-6)
    assert abs(vA['cosine_distance'] - vA['mean_frame_cosine_distance']) > 1e-4        # the construction tells them apart
    vids = m['videos'].values()
    assert m['identity']['mc']['cosine_distance'] == pytest.approx(np.mean([v['identity']['mc']['cosine_distance'] for v in vids]))
    assert m['identity']['mc']['mean_frame_cosine_distance'] == pytest.approx(np.mean([v['identity']['mc']['mean_frame_cosine_distance'] for v in vids]))
    # TL-ID / TG-ID of the edit, normalised by the original's (a static original: 1), so below 1 here
    assert m['videos']['A']['tl_id'] == pytest.approx(M.tl_id(eA, oA), rel=1e-6)
    assert m['videos']['A']['tl_id'] < 0.995
    assert m['videos']['A']['tg_id'] == pytest.approx(M.tg_id(eA, oA), rel=1e-6)


def test_evaluate_warp_error_uses_the_flow_and_mask_asked_for(ev):
    "The edit's and the original's warp errors are eq. 7 with --flow farneback and --occlusion-mask, each in its own field."
    w, res = ev
    v = res['cosine']['methods']['ed']['videos']['A']
    ef, of = _frames(w / 'ed' / 'A'), _frames(w / 'orig' / 'A')
    want = M.warp_error(ef, 'farneback', occlusion_mask=True)
    assert v['warp_error'] == pytest.approx(want, rel=1e-9)
    assert v['warp_error_original'] == pytest.approx(M.warp_error(of, 'farneback', occlusion_mask=True), abs=1e-9)
    assert v['warp_error_original'] < 1e-4 < v['warp_error']
    # the construction makes the settings matter: other flows or no mask give other numbers
    assert abs(M.warp_error(ef, 'dis', occlusion_mask=True) - want) > 1e-4
    assert abs(M.warp_error(ef, 'farneback') - want) > 1e-4
    assert res['cosine']['methods']['ed']['warp_error'] == pytest.approx(want, rel=1e-9)     # B, a still, has none


def test_per_video_csv_rows_hold_the_pair_ending_at_that_frame(ev):
    "Row t of per_video/METHOD/NAME.csv holds the warp error of the pair (t−1, t); row 0 has none."
    w, res = ev
    with open(w / 'rep_cosine' / 'per_video' / 'ed' / 'A.csv', newline='') as fh: rows = list(csv.DictReader(fh))
    _, per = M.warp_error(_frames(w / 'ed' / 'A'), 'farneback', occlusion_mask=True, return_per_frame=True)
    assert [r['frame'] for r in rows] == ['0', '1', '2'] and rows[0]['warp_error_edited'] == ''
    np.testing.assert_allclose([float(r['warp_error_edited']) for r in rows[1:]], per, atol=2e-6)
    assert abs(per[0] - per[1]) > 1e-3                                   # the two pairs differ: an off-by-one shows


def _table(text):
    "The first Markdown table in `text` as {row name: {column header: cell}}."
    lines = [l for l in text.splitlines() if l.startswith('|')]
    head = [c.strip() for c in lines[0].strip('|').split('|')]
    return {cells[0]: dict(zip(head, cells)) for cells in ([c.strip() for c in l.strip('|').split('|')] for l in lines[2:])}


def test_tables_put_every_number_in_its_column(ev):
    "table1.md and table3.md show metrics.json's method numbers under their own headers (R@1 ≠ MRR, edit ≠ original, TL ≠ TG here)."
    w, res = ev
    m = res['cosine']['methods']['ed']
    t1 = _table((w / 'rep_cosine' / 'table1.md').read_text())['ed']
    assert t1['mc R@1 ↑'] == '0.500' and t1['mc MRR ↑'] == '0.750'
    assert t1['mc cos. dist. ↓'] == f"{m['identity']['mc']['cosine_distance']:.4f}"
    t3 = _table((w / 'rep_cosine' / 'table3.md').read_text())['ed']
    want = {'Identity (mc cos. dist.) ↓': f"{m['identity']['mc']['cosine_distance']:.4f}", 'Warp error (farneback) ↓': f"{m['warp_error']:.4f}",
            'Warp error of the original': f"{m['warp_error_original']:.4f}", 'TL-ID ↑': f"{m['tl_id']:.3f}", 'TG-ID ↑': f"{m['tg_id']:.3f}"}
    assert {k: t3[k] for k in want} == want
    assert len({want['Warp error (farneback) ↓'], want['Warp error of the original']}) == 2 and want['TL-ID ↑'] != want['TG-ID ↑']


# ================================================================ metrics: the `ipfacediff evaluate` CLI

def test_cli_evaluate_passes_its_options_on(tmp_path, capsys):
    "`ipfacediff evaluate --rank-metric cosine --flow dis-fast --occlusion-mask` scores with those settings (metrics.json says so and its numbers agree)."
    import skimage.data
    a = skimage.data.astronaut()
    for d in ('orig/A', 'ed/A'): (tmp_path / d).mkdir(parents=True)
    for i in range(2):
        Image.fromarray(a).save(tmp_path / 'orig' / 'A' / f'{i}.png')
        Image.fromarray(np.roll(_tint(a, (0.8, 0.8, 0.8)), 6 * i, axis=1)).save(tmp_path / 'ed' / 'A' / f'{i}.png')
    out = tmp_path / 'rep'
    argv = ['evaluate', '--original', tmp_path / 'orig', '--edited', tmp_path / 'ed', '--out', out, '--quiet',
            '--rank-metric', 'cosine', '--flow', 'dis-fast', '--occlusion-mask']
    assert main([str(x) for x in argv], commands={'evaluate': ('ipfacediff.metrics', 'evaluate')}) == 0
    res = json.loads((out / 'metrics.json').read_text())
    s = res['settings']
    assert (s['rank_metric'], s['flow'], s['occlusion_mask']) == ('cosine', 'dis-fast', True)
    ef = M.load_media(tmp_path / 'ed' / 'A')
    want = M.warp_error(ef, 'dis-fast', occlusion_mask=True)
    assert res['methods']['ed']['warp_error'] == pytest.approx(want, rel=1e-9)
    assert abs(M.warp_error(ef, 'dis-fast') - want) > 1e-4                  # the mask matters for this pair
    assert 'Warp error (dis-fast)' in capsys.readouterr().out


# ================================================================ finetune: the `ipfacediff finetune` CLI

def _parse(mode, *args):
    return config_from_args(build_parser(['finetune']).parse_args(['finetune', mode, '--data', 'd', '--out', 'o', *args]))


@pytest.mark.parametrize('mode,args,msg', [
    ('identity', ['--resume', '--overwrite'], '--resume continues the run in --out and --overwrite deletes it: pass one of them'),
    ('identity', ['--fixed-t', '201', '--t-min', '101'], '--fixed-t trains at one timestep, so --t-min would be ignored'),
    ('identity', ['--lambda1', '0.5', '--templates'], 'identity fine-tuning does not use --lambda1 / --templates: drop them'),
    ('directional', ['--embedder', 'arcface=/w.pth'], 'directional fine-tuning does not use --embedder: drop it'),
    ('directional', ['--tiny', '--model', 'my/sd'], '--tiny uses tiny random SD and CLIP models: drop --model')])
def test_finetune_cli_refuses_options_it_would_ignore(mode, args, msg):
    "Options that would be silently ignored (or contradict each other) are refused in one line before any run."
    one_line_error(lambda: _parse(mode, *args), msg)


def test_finetune_cli_options_reach_the_config():
    "Every `ipfacediff finetune` option lands in its FinetuneConfig field (an option read under another name would fall back to the default)."
    c = _parse('identity', '--full', '--steps', '7', '--batch-size', '3', '--grad-accum', '2', '--lr', '3e-4', '--warmup-steps', '5',
               '--size', '96', '--mixed-precision', 'bf16', '--checkpoint-every', '4', '--keep-checkpoints', '3', '--inversion', 'noise',
               '--inversion-steps', '20', '--t-min', '50', '--t-max', '900', '--gen-steps', '2', '--gradient-checkpointing', '--seed', '9',
               '--num-workers', '1', '--device', 'cpu', '--tensorboard', '--embedder', 'arcface=/w.pth', '--model', 'my/sd')
    want = dict(mode='identity', lora=False, steps=7, batch_size=3, grad_accum=2, lr=3e-4, warmup_steps=5, size=96, mixed_precision='bf16',
                checkpoint_every=4, keep_checkpoints=3, inversion='noise', inversion_steps=20, t_min=50, t_max=900, gen_steps=2,
                gradient_checkpointing=True, seed=9, num_workers=1, device='cpu', tensorboard=True, embedder='arcface=/w.pth', model='my/sd')
    assert {k: getattr(c, k) for k in want} == want
    c = _parse('directional', '--captions', 'c.jsonl', '--rank', '8', '--templates', '--lambda1', '0.2', '--lambda2', '0.9',
               '--clip', 'my/clip', '--fixed-t', '201', '--cache-inversions')
    want = dict(mode='directional', captions='c.jsonl', lora=True, rank=8, templates=True, lambda1=0.2, lambda2=0.9, clip='my/clip',
                fixed_t=201, cache_inversions=True)
    assert {k: getattr(c, k) for k in want} == want


@pytest.fixture(scope='module')
def faces(tmp_path_factory):
    from ipfacediff.facedata import demo_faces
    return demo_faces(tmp_path_factory.mktemp('faces'), size=64, n_video=0)


def _run_args(faces, out, *extra, data=None):
    folder, caps = faces
    return ['finetune', 'directional', '--data', str(data or folder), '--captions', str(caps), '--out', str(out), '--tiny',
            '--fixed-t', '201', '--checkpoint-every', '2', '--keep-checkpoints', '2', '--no-progress', *extra]


@pytest.fixture(scope='module')
def finished(faces, tmp_path_factory):
    "A finished 3-step `finetune directional --tiny` run checkpointed every 2 steps (a module run: tests copy it before changing it)."
    out = tmp_path_factory.mktemp('ft') / 'run'
    assert main(_run_args(faces, out, '--steps', '3')) == 0
    return out


def _adapter(run):
    from safetensors.torch import load_file
    return load_file(str(Path(run) / 'adapter_model.safetensors'))


def test_finished_run_is_checkpointed_at_its_last_step_and_resumes_from_the_newest(faces, finished, tmp_path):
    """The last step is checkpointed even off the --checkpoint-every grid, so --resume with more --steps goes on from it:
    the newest complete checkpoint (not the oldest, not a `.partial` folder left by a kill during the save), at its step."""
    assert [c.name for c in _checkpoints(finished)] == ['step_000002', 'step_000003']
    run = tmp_path / 'run'; shutil.copytree(finished, run)
    shutil.copytree(run / 'checkpoints' / 'step_000003', run / 'checkpoints' / 'step_000004.partial')   # killed before its rename
    cfg = config_from_args(build_parser(['finetune']).parse_args(_run_args(faces, run, '--steps', '5', '--resume')))
    ft = Finetuner(cfg, resume=True)
    assert ft.resume_from.name == 'step_000003' and ft.step == 3


def test_cli_resume_from_a_named_checkpoint(faces, finished, tmp_path):
    "`--resume CHECKPOINT` (of another run) continues from that checkpoint's step into a new --out, ending where the straight run ended."
    out = tmp_path / 'from2'
    assert main(_run_args(faces, out, '--steps', '3', '--resume', str(finished / 'checkpoints' / 'step_000002'))) == 0
    assert [r['step'] for r in read_log(out)] == [3]                                   # step 3 only: steps 1-2 came from the checkpoint
    a, b = _adapter(finished), _adapter(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_checkpoint_past_steps(faces, finished, tmp_path, capsys):
    "Resuming a run at step 3 with --steps 2 is refused (it would train nothing and save the step-3 weights as if 2), and nothing is written."
    run = tmp_path / 'run'; shutil.copytree(finished, run)
    before = {p: p.stat().st_mtime_ns for p in run.rglob('*')}
    capsys.readouterr()
    assert main(_run_args(faces, run, '--steps', '2', '--resume')) == 2
    err = capsys.readouterr().err
    assert 'is at step 3, past --steps 2: pass --steps 3 or more' in err and err.count('\n') == 1, err
    assert {p: p.stat().st_mtime_ns for p in run.rglob('*')} == before


def test_resume_refuses_another_image_set(faces, finished, tmp_path, capsys):
    "A checkpoint resumed with --data holding one image more is refused: the data order (and so the run) would differ."
    folder, caps = faces
    data = tmp_path / 'data'; shutil.copytree(folder, data)
    first = sorted(data.glob('*.png'))[0]; shutil.copy(first, data / 'zz_extra.png')
    lines = caps.read_text().splitlines()
    (data / 'captions.jsonl').write_text('\n'.join(lines + [json.dumps({'image': 'zz_extra.png', 'caption': 'a photo of a face'})]) + '\n')
    run = tmp_path / 'run'; shutil.copytree(finished, run)
    capsys.readouterr()
    args = _run_args(faces, run, '--steps', '4', '--resume', data=data)
    args[args.index('--captions') + 1] = str(data / 'captions.jsonl')
    assert main(args) == 2
    assert 'was made on another image set' in capsys.readouterr().err


def test_overwrite_starts_the_run_afresh(faces, finished, tmp_path):
    "--overwrite empties the run folder first: the old run's later checkpoints and log rows do not survive into the new run."
    run = tmp_path / 'run'; shutil.copytree(finished, run)
    assert main(_run_args(faces, run, '--steps', '1', '--overwrite')) == 0
    assert [c.name for c in _checkpoints(run)] == ['step_000001'] and [r['step'] for r in read_log(run)] == [1]
