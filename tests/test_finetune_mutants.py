"""Invariants of `ipfacediff.finetune` that no other test pinned down (mutation review of fine-tuning ε1 / ε2: each test
fails on at least one code change that the notebook's checks and the rest of tests/ let through). What they pin: the
data stream's epoch e is `randperm` seeded by seed + e, and several processes resumed at a step take the same global
batches an uninterrupted single-process stream would; the logged part1 / part2 are eq. 5's L1 / D_cos and eq. 6's image /
direction terms, each weighted by its own λ, and averaged over the accumulated micro-batches; `--inversion noise` draws
x_t = √ᾱ_t·z0 + √(1−ᾱ_t)·n; the inversion cache copes with a batch that is only partly cached; a resumed run gets back
the global RNG states and refuses another --mixed-precision; full fine-tuning inverts with a frozen copy of the base;
generic_p reaches the prompt sampler and may be 1; eval_loss weights a short last batch by its size. Tiny random SD
+ tiny CLIP on real face crops at 64 px, offline, one core."""
import os, random

os.environ.setdefault('HF_HUB_OFFLINE', '1')
import numpy as np
import pytest
import torch

import ipfacediff.finetune as FT
from ipfacediff.facedata import FaceDataset, demo_faces
from ipfacediff.finetune import FinetuneConfig, Finetuner, StreamBatchSampler, _checkpoints, collate_faces, read_log
from ipfacediff.models import tiny_components
from ipfacediff.utils import UserError

torch.set_num_threads(1)

BASE = dict(tiny=True, size=64, batch_size=2, inversion_steps=10, rank=4, lr=2e-3, checkpoint_every=100, fixed_t=101)


@pytest.fixture(scope='module')
def faces(tmp_path_factory):
    folder, caps = demo_faces(tmp_path_factory.mktemp('faces'), size=64, n_video=1)
    ds = FaceDataset(folder, caps, size=64, quiet=True)
    assert len(ds) % 2 == 1, len(ds)        # an odd count: a batch of 2 leaves a short last batch
    return folder, caps, ds


def _arc():
    "A fixed random differentiable stand-in for f_arc."
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, 2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
    with torch.no_grad():
        for p in net.parameters(): p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net.requires_grad_(False)


def _ft(faces, out, mode='directional', dataset=True, **kw):
    folder, caps, ds = faces
    cfg = FinetuneConfig(mode=mode, data=str(folder), captions=str(caps), out=str(out), **{**BASE, **kw})
    return Finetuner(cfg, comps=tiny_components(0), dataset=ds if dataset else None, f_arc=_arc() if mode == 'identity' else None)


def _resume(faces, out, **kw):
    folder, caps, ds = faces
    cfg = FinetuneConfig(mode='directional', data=str(folder), captions=str(caps), out=str(out), **{**BASE, **kw})
    return Finetuner(cfg, comps=tiny_components(0), dataset=ds, resume=True)


# ---------------------------------------------------------------- the data stream

def test_each_epoch_is_the_permutation_of_seed_plus_epoch():
    "Epoch e of the stream is randperm(n) seeded by seed + e: a new order every epoch, not the first one again."
    it = iter(StreamBatchSampler(5, 5, seed=1))
    want = [torch.randperm(5, generator=torch.Generator().manual_seed(1 + e)).tolist() for e in range(3)]
    assert [next(it) for _ in range(3)] == want
    assert want[0] != want[1]


def test_processes_resumed_at_a_step_take_the_single_process_batches():
    "With 2 processes of batch 2, global batch b is single-process batches 2b and 2b+1, one per rank, also when resumed at b."
    single = iter(StreamBatchSampler(7, 2, seed=3))
    flat = [next(single) for _ in range(8)]
    for start in (0, 1, 3):
        got = [next(iter(StreamBatchSampler(7, 2, seed=3, start=start, rank=r, world=2))) for r in (0, 1)]
        assert got == [flat[2 * start], flat[2 * start + 1]], start


# ---------------------------------------------------------------- eq. 5 / eq. 6 and what is logged

def test_directional_parts_are_the_image_and_direction_terms_each_with_its_lambda(faces, tmp_path):
    "part1 is eq. 6's image term (weighted by λ1), part2 its direction term (weighted by λ2): λ1 = 1, λ2 = 0 gives loss = part1."
    ft = _ft(faces, tmp_path / 'r')
    b = collate_faces([ft.dataset[0], ft.dataset[1]])
    for l1, l2, k in ((1.0, 0.0, 0), (0.0, 1.0, 1)):
        ft.cfg.lambda1, ft.cfg.lambda2 = l1, l2
        with torch.no_grad(): loss, parts = ft.loss(b, 101, torch.Generator().manual_seed(0))
        assert loss.item() == pytest.approx(parts[k].item(), rel=1e-5)
        assert abs(parts[1 - k].item() - parts[k].item()) > 1e-4       # the two terms differ, so the check above tells them apart


def test_identity_parts_are_l1_then_dcos(faces, tmp_path, monkeypatch):
    "part1 of eq. 5 is the L1 term, part2 D_cos, as identity_loss names them."
    ft = _ft(faces, tmp_path / 'r', mode='identity')
    seen, real = {}, FT.identity_loss
    def spy(*a, **k):
        seen['out'] = real(*a, **k)
        return seen['out']
    monkeypatch.setattr(FT, 'identity_loss', spy)
    with torch.no_grad(): _, parts = ft.loss(collate_faces([ft.dataset[0], ft.dataset[1]]), 101, torch.Generator().manual_seed(0))
    p = seen['out'][1]
    assert (parts[0].item(), parts[1].item()) == (p['l1'].item(), p['dcos'].item()) and p['l1'].item() != p['dcos'].item()


def test_logged_parts_are_the_mean_over_accumulated_microbatches(faces, tmp_path, monkeypatch):
    "With --grad-accum 2 a log row's part1 and part2 are the means of the two micro-batches' parts, as its loss is."
    parts, real = [], Finetuner.loss
    def spy(self, *a, **k):
        loss, p = real(self, *a, **k)
        parts.append([x.item() for x in p])
        return loss, p
    monkeypatch.setattr(Finetuner, 'loss', spy)
    ft = _ft(faces, tmp_path / 'r', steps=1, grad_accum=2, inversion='noise')
    ft.train(progress=False)
    row, = read_log(ft.out)
    assert len(parts) == 2
    assert (row['part1'], row['part2']) == pytest.approx(((parts[0][0] + parts[1][0]) / 2, (parts[0][1] + parts[1][1]) / 2), rel=1e-6)


def test_noise_inversion_is_q_of_x_t_given_x0(faces, tmp_path):
    "--inversion noise: x_t = √ᾱ_t·z0 + √(1−ᾱ_t)·n with n drawn from the step's generator."
    ft = _ft(faces, tmp_path / 'r', inversion='noise')
    b = collate_faces([ft.dataset[0], ft.dataset[1]])
    x_t = ft._x_t(b['image'], None, 401, b['index'], torch.Generator().manual_seed(5))
    z0 = ft._encode(b['image'])
    n = torch.randn(z0.shape, generator=torch.Generator().manual_seed(5))
    a = ft.abar[401]
    torch.testing.assert_close(x_t, a.sqrt() * z0 + (1 - a).sqrt() * n)


def test_inversion_cache_is_per_image_and_t_and_fills_a_partly_cached_batch(faces, tmp_path):
    "--cache-inversions: with image 0 inverted to t = 101 and 201, a batch of images 0 and 1 gets the fresh x_t of both at either t."
    ft = _ft(faces, tmp_path / 'r', cache_inversions=True, fixed_t=None, t_min=101, t_max=201)
    b0, b01 = collate_faces([ft.dataset[0]]), collate_faces([ft.dataset[0], ft.dataset[1]])
    c = lambda b: FT.encode_prompt(ft.comps, b['caption']).float()
    for t in (101, 201): ft._x_t(b0['image'], c(b0), t, b0['index'], None)
    got = {t: ft._x_t(b01['image'], c(b01), t, b01['index'], None) for t in (101, 201)}
    ft.cfg.cache_inversions = False
    for t in (101, 201): torch.testing.assert_close(got[t], ft._x_t(b01['image'], c(b01), t, b01['index'], None), atol=1e-5, rtol=1e-4)


def test_eval_loss_weights_a_short_last_batch_by_its_size(faces, tmp_path):
    "eval_loss is the mean over images: batches of 2 (the last one short) give what batches of 1 give."
    ft = _ft(faces, tmp_path / 'r', mode='identity')
    a, b = ft.eval_loss(ts=[101], batch_size=2), ft.eval_loss(ts=[101], batch_size=1)
    for k in ('loss', 'part1', 'part2'): assert a[k] == pytest.approx(b[k], rel=1e-4), k


# ---------------------------------------------------------------- what is built, resumed and refused

def test_full_finetuning_inverts_with_a_frozen_copy_of_the_base(faces, tmp_path):
    "lora=False: the base ε used for DDIM inversion is a frozen copy, left unchanged while the trained UNet moves."
    ft = _ft(faces, tmp_path / 'r', lora=False, steps=1, lr=1e-2)
    assert ft.base is not ft.unwrapped and not any(p.requires_grad for p in ft.base.parameters())
    before = {k: v.clone() for k, v in ft.base.state_dict().items()}
    ft.train(progress=False)
    assert all(torch.equal(v, before[k]) for k, v in ft.base.state_dict().items())
    assert any(not torch.equal(v, before[k]) for k, v in ft.unwrapped.state_dict().items())


def test_generic_p_reaches_the_prompt_sampler(faces, tmp_path):
    "generic_p (the share of generic prompt pairs) is the sampler's, not its default."
    assert _ft(faces, tmp_path / 'r', generic_p=0.0).prompts.generic_p == 0.0


def test_resume_restores_the_global_rng_states(faces, tmp_path):
    "A resumed run gets back torch's, numpy's and Python's global RNG states as they were at its checkpoint."
    _ft(faces, tmp_path / 'r', steps=1, checkpoint_every=1).train(progress=False)
    st = torch.load(_checkpoints(tmp_path / 'r')[-1] / 'training_state.pt', weights_only=False)['rng']
    torch.manual_seed(123); np.random.seed(123); random.seed(123)
    _resume(faces, tmp_path / 'r', steps=2, checkpoint_every=1)
    assert torch.equal(torch.get_rng_state(), st['torch'])
    assert np.random.get_state()[1].tolist() == st['numpy'][1].tolist() and random.getstate() == st['python']


def test_resume_refuses_another_mixed_precision(faces, tmp_path):
    "--mixed-precision is a setting a resumed run must keep."
    _ft(faces, tmp_path / 'r', steps=1, checkpoint_every=1).train(progress=False)
    with pytest.raises(UserError, match=r"different settings \(mixed_precision='no'\)"):
        _resume(faces, tmp_path / 'r', steps=2, checkpoint_every=1, mixed_precision='bf16')


def test_config_takes_generic_p_one():
    "generic_p is a share: 1 (every prompt pair generic) is allowed, as 0 is."
    assert FinetuneConfig(data='x', out='y', generic_p=1.0).check().generic_p == 1.0
    assert FinetuneConfig(data='x', out='y', generic_p=0.0).check().generic_p == 0.0
