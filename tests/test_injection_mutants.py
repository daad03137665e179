"""Mutation review of 07_injection (`AttentionControl`: ε1's attn1 Q,K and `up_blocks.1.resnets.1` features replayed into ε2).
Each test kills code changes that the rest of tests/ and the notebook let live; its docstring names them. What they pin: every
recording is a Features of its own (PnP keeps ε1's features of every step); a batched recording holds copies of the source
rows, not views of the whole batch; `Features.select` keeps the order of the rows asked for. Tiny random UNets
(`two_branches`), offline, one core."""
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')
import pytest
import torch

from ipfacediff.ddim import ddim_timesteps
from ipfacediff.injection import AttentionControl, BatchedSource, Features, StepPlan
from shared import two_branches

T = 501


@pytest.fixture(scope='module')
def nets():
    torch.set_num_threads(1)
    return two_branches(2, 'a face with glasses')


def test_every_recording_is_a_features_of_its_own(nets):
    """ε1's features of one step stay as recorded when the next step is recorded (PnP replays ε1's features of every step,
    which a caller may record ahead): each `record` returns a new Features. Kills: `forward` not starting a fresh
    `Features()` (the recordings of all steps are one object, overwritten by the last)."""
    eps1, zs, c = nets['eps1'], nets['z_src'], nets['c_src']
    ts = ddim_timesteps(4)[:2]
    with AttentionControl(eps1) as src: fs = [src.record(zs, t, c)[1] for t in ts]
    for t, f in zip(ts, fs):
        with AttentionControl(eps1) as fresh: _, want = fresh.record(zs, t, c)
        for a, b in zip(f._maps(), want._maps()):
            assert sorted(a) == sorted(b)
            assert all(torch.equal(a[n], b[n]) for n in a), t
    name = next(iter(fs[0].q))
    assert (fs[0].q[name] - fs[1].q[name]).abs().max() > 1e-4   # the steps' features differ: the check can tell them apart


def test_a_batched_recording_holds_only_the_source_rows_memory(nets):
    """Recording with a BatchedSource keeps a copy of the source rows of every feature, not a view of the whole batch (which
    would hold the 3× larger edit rows of every layer alive for as long as the features are kept). Kills: `_keep` returning
    `t[:n_source]` without `.clone()`."""
    with AttentionControl(nets['eps1']) as ctl:
        ctl.forward(nets['z'], T, nets['c_cfg'], StepPlan(record=True), source=BatchedSource(nets['z_src'], nets['c_src']))
        f = ctl.features
    ts = [v for d in f._maps() for v in d.values()]
    assert len(ts) == 8 + 8 + 1 and all(v.shape[0] == 2 for v in ts)
    assert all(v.untyped_storage().nbytes() == v.numel() * v.element_size() for v in ts)


def test_select_keeps_the_order_of_the_rows_asked_for(nets):
    """`Features.select(rows)` gives row rows[i] as row i for every map (keyframes in `kf_idx` order, frames of a batch),
    and `Features.cat` joins them back in order. Kills: `select` sorting the rows."""
    with AttentionControl(nets['eps1']) as src:
        _, f = src.record(torch.cat([nets['z_src'], nets['z_src'][:1] * 0.5]), T, nets['c_src'])
    s = f.select([2, 0])
    assert len(s) == 2 and all(len(d) for d in s._maps()[:1] + s._maps()[3:])
    for a, b in zip(s._maps(), f._maps()):
        for n in a: assert torch.equal(a[n], b[n][[2, 0]])
    back = Features.cat([f.select([0]), f.select([1, 2])])
    assert all(torch.equal(a[n], b[n]) for a, b in zip(back._maps(), f._maps()) for n in a)
