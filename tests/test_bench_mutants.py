"""Invariants of `ipfacediff bench` that no other test pinned down (mutation review of bench.py and the budget code of
pipeline.py: each test fails on at least one code change that the notebook's checks and the rest of tests/ let through).
What they pin: the UNet-call budget for an attention window longer than the feature window, for fewer editing than
inversion steps, for the NN field's every-step source pass, and over the edited span only (frames without a face are
not edited), each worked out by hand and equal to the rows a forward hook of this file sees; `budget_ok` reporting a
disagreement; the keyframes' extended-attention FLOPs at 3 keyframes in a group; VAE FLOPs of the edited crops only; stage TFLOP/s in TFLOP per second;
the report's `inversion_steps`, `data_mb`, `rss_peak_mb` and `rss_growth_mb`; per-stage peaks (RSS and CUDA) that
belong to their own stage; CPU seconds measured as process time. Tiny random networks, the bundled clip, CPU, one
thread, offline; no wall-clock speed is judged."""
import contextlib, os, time
from types import SimpleNamespace

os.environ.setdefault('HF_HUB_OFFLINE', '1')
import numpy as np
import pytest
import torch

from ipfacediff.bench import BenchTimer, bench, bench_run, make_pipeline, sample_frames
from ipfacediff.pipeline import EditConfig, unet_budget

FLOPS = {'unet': 1e9, 'vae_encode': 3e9, 'vae_decode': 5e9, 'selfattn': 7e6, 'text': 0.0}   # made up: round numbers


@contextlib.contextmanager
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    try: yield
    finally: torch.set_num_threads(n)


def row_hook(pipe):
    "UNet rows (frames) the UNet modules are given, counted by a forward pre-hook of this file's own."
    seen = []
    def hook(module, args, kwargs):
        x = args[0] if args else kwargs['sample']
        seen.append(int(x.shape[0]))
    for u in {id(u): u for u in (pipe.eps1, pipe.eps2)}.values(): u.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


# ================================================================ the budget: worked out by hand, seen on the UNet

# 2 grey frames without a face, then 6 frames of the sample: 6 are edited. Batches of 2 → K = 3 keyframes, all in one
# group (keyframe window None). 2 editing steps on a 4-step inversion grid. τ_attn 0.5 > τ_conv 0: the first of the 2
# steps injects attention only, the second nothing → W = 1 step with a source pass.
N_EDIT, S, S_INV, K, W = 6, 2, 4, 3, 1
BUDGET = {'inversion': N_EDIT * S_INV,          # 24: S_inv rows per edited frame
          'edit': 2 * N_EDIT * S,                # 24: classifier-free guidance, 2 rows per frame and step
          'keyframes': 2 * K * S,                # 12: the keyframes, guided too
          'source': (N_EDIT + K) * W}            # 9: ε1's source rows of frames and keyframes while a window is open


@pytest.fixture(scope='module')
def partial_run():
    "bench_run on 2 faceless + 6 face frames with the settings above, made-up FLOPs per evaluation, peak 1 TFLOP/s."
    with one_thread():
        pipe = make_pipeline('tiny', 'cpu')
        seen = row_hook(pipe)
        clip, fps = sample_frames(N_EDIT)
        frames = np.concatenate([np.full_like(clip[:2], 128), clip])
        cfg = EditConfig('add glasses', size=64, steps=S, inversion_steps=S_INV, batch_size=2, keyframe_window=None,
                         attn_t=0.5, conv_t=0.0)
        with pytest.warns(UserWarning):                      # the 2 frames without a face are left unedited
            r = bench_run(pipe, frames, fps, cfg, FLOPS, 1.0, write=False)
    return r, seen


def test_budget_by_hand_over_the_edited_frames(partial_run):
    """Kills P04 (source window = the feature window only: 0 here, as τ_conv = 0), P05 (window counted on the 4-step
    inversion grid: 2 steps) and P14 (budget over all 8 frames, not the 6 edited): the budget is the formula by hand."""
    r, _ = partial_run
    assert r['frames'] == 8
    assert r['budget'] == BUDGET
    assert r['unet_calls'] == BUDGET and r['budget_ok']


def test_budget_equals_the_rows_the_unet_was_given(partial_run):
    "What the UNet modules really got, counted by this file's hook: the budget's total; the inversion stage its S_inv rows per frame."
    r, seen = partial_run
    assert sum(seen) == sum(BUDGET.values()) == 69
    assert r['stages']['inversion']['unet_evals'] == BUDGET['inversion']
    assert r['stages']['edit']['unet_evals'] == sum(BUDGET.values()) - BUDGET['inversion']


def test_edit_flops_count_2g_g_minus_1_keyframe_pairs(partial_run):
    """Kills P13 (kf_pairs g² instead of 2g(g−1): equal at g = 2, the only group size other tests use): 3 keyframes in a
    group, each of the 2·3 guidance rows attends to 2 more keyframes → 12 pairs per step."""
    r, _ = partial_run
    st = r['stages']['edit']
    assert st['flops'] == (BUDGET['edit'] + BUDGET['keyframes'] + BUDGET['source']) * FLOPS['unet'] + S * 2 * 3 * 2 * FLOPS['selfattn']


def test_vae_flops_count_the_crops_encoded_and_decoded(partial_run):
    "Only the 6 frames with a face are encoded and decoded: the 2 before it have no crop (once all 8 were counted)."
    r, _ = partial_run
    assert r['stages']['encode']['flops'] == N_EDIT * FLOPS['vae_encode']
    assert r['stages']['decode']['flops'] == N_EDIT * FLOPS['vae_decode']


def test_stage_tflops_are_flops_per_second_over_1e12(partial_run):
    "Kills M07 / M08 (a stage's achieved TFLOP/s divided by 1e9, or with milliseconds): FLOPs from the hand count, over the stage's seconds."
    r, _ = partial_run
    by_hand = {'inversion': BUDGET['inversion'] * FLOPS['unet'],
               'edit': (BUDGET['edit'] + BUDGET['keyframes'] + BUDGET['source']) * FLOPS['unet'] + S * 2 * 3 * 2 * FLOPS['selfattn']}
    for name, fl in by_hand.items():
        st = r['stages'][name]
        assert st['flops'] == fl
        assert st['achieved_tflops'] == pytest.approx(fl / st['seconds'] / 1e12, rel=1e-12)
        assert st['floor_s'] == pytest.approx(fl / 1e12, rel=1e-12)              # peak 1 TFLOP/s
        assert st['floor_ratio'] == pytest.approx(st['seconds'] / (fl / 1e12), rel=1e-12)


def test_budget_when_nn_field_comes_from_a_source_pass():
    "Kills P08: with nn_from='source' (TokenFlow's way) ε1 runs on frames and keyframes at every step, window or not."
    cfg = EditConfig('x', steps=10, inversion_steps=10, nn_from='source', attn_t=0.2, conv_t=0.3)
    assert unet_budget(20, cfg) == {'inversion': 200, 'edit': 400, 'keyframes': 60, 'source': (20 + 3) * 10}
    assert unet_budget(20, EditConfig('x', steps=10, inversion_steps=10, attn_t=0.2, conv_t=0.3))['source'] == (20 + 3) * 3


def test_budget_ok_is_false_when_the_rows_differ(monkeypatch):
    "Kills M13 (budget_ok always True): a budget one edit row off the rows counted is reported as not kept."
    import ipfacediff.pipeline as P
    real = P.unet_budget
    monkeypatch.setattr(P, 'unet_budget', lambda *a, **k: {**real(*a, **k), 'edit': real(*a, **k)['edit'] + 1})
    with one_thread():
        pipe = make_pipeline('tiny', 'cpu')
        clip, fps = sample_frames(2)
        r = bench_run(pipe, clip, fps, EditConfig('x', size=64, steps=1, inversion_steps=1), FLOPS, 1.0, write=False)
    # 2 frames, 1 step: τ_attn·1 and τ_conv·1 round down to 0 steps, so no source pass; one keyframe
    assert r['unet_calls'] == {'inversion': 2, 'edit': 4, 'keyframes': 2} and r['budget']['edit'] == 5
    assert r['budget_ok'] is False


# ================================================================ the report of bench()

@pytest.fixture(scope='module')
def report():
    "bench() on 4 frames: 2 editing steps, 4 inversion steps, 64², no warm-up, no mp4."
    with one_thread():
        return bench('tiny', frames=[4], size=64, steps=2, inversion_steps=4, warmup=False, write=False, log=lambda *a: None)


def test_report_says_the_inversion_steps_run(report):
    "Kills M27 (the report's inversion_steps = the editing steps): 4 inversion steps ran, 4 UNet rows per frame."
    assert report['steps'] == 2 and report['inversion_steps'] == 4
    assert report['runs'][0]['budget']['inversion'] == report['runs'][0]['unet_calls']['inversion'] == 4 * 4


def test_data_mb_is_the_frames_crops_and_latents_held(report):
    """Kills M15 (trajectory counted at every editing step): frames and the edited copy (2×), crops and their copy
    (2×), z0 / z / new (float32) and z_T (float32), the other S − 1 trajectory latents in float32 (the tiny nets' dtype)."""
    run, n = report['runs'][0], 4
    frames, _ = sample_frames(n)
    lat = n * 4 * (64 // 8) ** 2                               # latents of 4 frames: 4 channels at 64/8 = 8²
    want = 2 * frames.nbytes + 2 * n * 64 * 64 * 3 + lat * (3 * 4 + 4 + 4 * (2 - 1))
    assert run['data_mb'] == pytest.approx(want / 2**20, rel=1e-12)


def test_run_memory_is_the_largest_stage_peak(report):
    "Kills M17 / M18: the run's RSS peak is the largest of its stages', its growth that peak minus the RSS at the start."
    run = report['runs'][0]
    assert run['rss_peak_mb'] == max(st['peak_rss_mb'] for st in run['stages'].values())
    assert run['rss_growth_mb'] == pytest.approx(run['rss_peak_mb'] - run['rss_start_mb'], abs=1e-9)


# ================================================================ BenchTimer: each stage's own peak, process CPU time

def fake_pipe(dev='cpu'):
    return SimpleNamespace(c=SimpleNamespace(device=torch.device(dev)), calls={}, forward_rows=0)


def test_stage_rss_peak_is_its_own():
    "Kills M19 (a stage's RSS peak carries the earlier stages'): 256 MiB touched and freed in stage a do not show in stage b."
    t = BenchTimer(fake_pipe())
    with t('a'):
        x = np.ones(64 * 2**20, np.float32); x.sum(); del x      # 256 MiB, every page written
    with t('b'): pass
    assert t.rss_peak['a'] - t.rss_start > 200 * 2**20
    assert t.rss_peak['b'] < t.rss_peak['a'] - 150 * 2**20


def test_stage_cuda_peak_is_its_own(monkeypatch):
    """Kills M20 (CUDA peak not reset at each stage) with a pretend GPU: `max_memory_allocated` since the last reset;
    stage a peaks at 100 MiB and frees it, stage b allocates 10 MiB: b's peak is 10 MiB."""
    mem = {'now': 0, 'peak': 0}
    def alloc(mib): mem['now'] += mib * 2**20; mem['peak'] = max(mem['peak'], mem['now'])
    for name, fn in (('is_available', lambda: True), ('is_initialized', lambda: True), ('synchronize', lambda *a: None),
                     ('reset_peak_memory_stats', lambda *a: mem.update(peak=mem['now'])),
                     ('max_memory_allocated', lambda *a: mem['peak'])):
        monkeypatch.setattr(torch.cuda, name, fn)
    t = BenchTimer(fake_pipe('cpu'))
    with t('a'): alloc(100); alloc(-100)
    with t('b'): alloc(10)
    assert t.cuda_peak == {'a': 100 * 2**20, 'b': 10 * 2**20}


def test_stage_cpu_seconds_are_process_time():
    "Kills M24 (CPU seconds on the wall clock): a stage that sleeps 0.3 s uses next to no CPU time."
    t = BenchTimer(fake_pipe(), interval=0.05)
    with t('sleep'): time.sleep(0.3)
    assert t.seconds['sleep'] >= 0.3
    assert t.cpu_seconds['sleep'] < 0.1
