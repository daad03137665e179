"""Mutation review of `ipfacediff.pipeline` (nbs/09_pipeline): behaviour that the notebook and the rest of tests/ let through.
Each test names the code changes of the library it catches. What these tests pin: `EditConfig.validate` at the edges of
every range (size 0, batch size 0, fps below 0.01, guidance 0 and τ = 1 allowed, keyframe window 0 and an unknown `nn_from`
refused); `unet_budget` counts the inversion with --inversion-steps; `cache_key` ignores the order of the settings and leaves
a caller's hash object as it was; an inversion cache file of other latents' shape is recomputed, and a hit marks the file used;
`merge_keyframes` of one part keeps only that part's keyframes; the DDIM state of an edit is float32 whatever the trajectory's
dtype, and the guidance of half-precision networks is taken in float32; a cached face track of another length is not served; `encode_frames` refuses a track of another length;
`_stream_choice(False, …)` never streams; a streamed edit's budget counts the edited frames only; a guidance below 1 is warned of; with LoRA
branches the inversion cache follows ε1's adapter, not ε2's; `edit_video` refuses raw frames with stream=True and an existing out= before SD loads;
`AdapterRows` refuses rows it cannot attribute; `check_tiny_flags` takes --device cpu and --dtype fp32; `edit --tiny` builds
the tiny model its branches were trained on. Tiny random models, data/sample.mp4, CPU, offline, one core."""
import os

os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import argparse, hashlib, json, time, warnings
import numpy as np, pytest, torch

from ipfacediff.ddim import ddim_timesteps
from ipfacediff.models import DEFAULT_MODEL, tiny_components
from ipfacediff.pipeline import (EditConfig, IPFaceDiffPipeline, cache_key, check_tiny_flags, merge_keyframes, unet_budget,
                                 _stream_choice)
from ipfacediff.propagation import Keyframes
from ipfacediff.utils import UserError, data_path
from ipfacediff.video import read_video
from shared import one_line_error

torch.set_num_threads(1)
SAMPLE = str(data_path('sample.mp4'))
TINY = dict(size=64, steps=1, inversion_steps=1, batch_size=2)   # the smallest real edit


@pytest.fixture(scope='module')
def frames():
    "The sample's first 3 frames and its fps."
    f, info = read_video(SAMPLE, max_frames=3, progress=False)
    return f, info.fps


@pytest.fixture
def pipe(tmp_path):
    "A tiny-model pipeline with its own, empty cache."
    return IPFaceDiffPipeline.tiny(0, cache_dir=tmp_path / 'cache', progress=False)


# ---------------------------------------------------------------- EditConfig.validate at its edges

@pytest.mark.parametrize('kw,part', [(dict(size=0), '--size'), (dict(batch_size=0), '--batch-size'), (dict(fps=0.005), '--fps 0.005'),
                                     (dict(keyframe_window=0), '--keyframe-window'), (dict(nn_from='tokenflow'), 'nn_from')],
                         ids=['size0', 'batch0', 'fps0.005', 'window0', 'nn_from'])
def test_validate_refuses_the_first_value_out_of_range(kw, part):
    """The first value beyond each range is a one-line `UserError` naming the option. Kills: `self.size < 64` made `< 0`
    (size 0 passes `0 % 64`), `batch_size < 1` made `< 0`, the 0.01 fps floor lowered, `keyframe_window < 1` made `< 0`
    (0 is the CLI's spelling of None, not a window), the `nn_from` check dropped."""
    one_line_error(lambda: EditConfig('add glasses', **kw).validate(), part)


@pytest.mark.parametrize('kw', [dict(guidance=0), dict(attn_t=1, conv_t=1), dict(attn_t=0, conv_t=0)], ids=['guidance0', 'tau1', 'tau0'])
def test_validate_accepts_the_ends_of_its_ranges(kw):
    """guidance 0 ("a finite number ≥ 0") and τ_attn = τ_conv = 1 or 0 ("between 0 and 1") are settings, not errors.
    Kills: `self.guidance >= 0` made `> 0`; `0 <= τ <= 1` made `0 <= τ < 1`."""
    assert EditConfig('add glasses', **kw).validate()


# ---------------------------------------------------------------- accounting and cache keys

def test_budget_counts_the_inversion_with_inversion_steps():
    """4 frames inverted with 4 steps for a 2-step edit: 16 inversion rows, not 8. Kills: `n_frames * cfg.inversion_steps`
    made `n_frames * cfg.steps`."""
    assert unet_budget(4, EditConfig('x', steps=2, inversion_steps=4))['inversion'] == 16
    assert unet_budget(4, EditConfig('x', steps=2, inversion_steps=4), cached=True)['inversion'] == 0


def test_cache_key_ignores_the_order_of_the_settings():
    """The same settings given in another order are the same entry. Kills: `sort_keys=True` dropped from the key's json."""
    c = np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3)
    assert cache_key(c, steps=50, prompt='a face') == cache_key(c, prompt='a face', steps=50)


def test_cache_key_of_a_hash_object_leaves_it_as_it_was():
    """A `hashlib.sha256` fed with the crops (as `encode_frames` returns) keys like the bytes themselves, as often as it is
    asked, and is not fed the settings. Kills: `data.copy()` made `data` (the caller's hash is updated in place)."""
    b = np.arange(96, dtype=np.uint8).tobytes()
    h = hashlib.sha256(b)
    assert cache_key(h, steps=2) == cache_key(h, steps=2) == cache_key(b, steps=2)
    assert h.hexdigest() == hashlib.sha256(b).hexdigest()


# ---------------------------------------------------------------- the inversion cache

def test_inversion_cache_file_of_other_latents_is_recomputed(pipe):
    """A file under the key's name whose latents have another shape (other crops: copied from elsewhere) is not served: a
    warning, a new inversion of the right shape, and the file replaced. Kills: the `traj[t].shape == z0.shape` check dropped."""
    cfg = EditConfig('add glasses', **{**TINY, 'steps': 2, 'inversion_steps': 2})
    g = torch.Generator().manual_seed(0)
    pipe.invert(torch.randn(2, 4, 8, 8, generator=g), cfg, key='k')
    z0 = torch.randn(3, 4, 8, 8, generator=g)
    with pytest.warns(UserWarning, match='does not fit this edit'): traj, hit = pipe.invert(z0, cfg, key='k')
    assert not hit and all(traj[t].shape == z0.shape for t in ddim_timesteps(2))
    assert pipe.invert(z0, cfg, key='k')[1]


def test_inversion_cache_hit_marks_the_file_used(pipe):
    """Reading an inversion from the cache sets its file's modification time to now (its last use, what cache pruning
    goes by). Kills: `mark_used(path)` dropped from `invert`'s cache hit."""
    cfg = EditConfig('add glasses', **TINY)
    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pipe.invert(z0, cfg, key='k')
    path = pipe.cache_dir / 'inversion' / 'k.pt'
    os.utime(path, (1e9, 1e9))                                   # last used in 2001
    assert pipe.invert(z0, cfg, key='k')[1]
    assert path.stat().st_mtime > time.time() - 600


# ---------------------------------------------------------------- keyframes and the edit's state

def test_merge_of_one_part_keeps_only_its_keyframes():
    """One (Keyframes, slice) piece that is not the whole: its keyframes alone, as for several pieces. Kills: the shortcut
    `len(parts) == 1` returning the whole Keyframes without checking that the slice covers them all."""
    kf = Keyframes(idx=torch.tensor([3, 9, 17]), tokens={'a': torch.arange(3.)[:, None, None].expand(3, 2, 4)},
                   out={'a': torch.arange(6.).view(2, 3, 1, 1).expand(2, 3, 2, 4)})
    m = merge_keyframes([(kf, slice(1, 2))])
    assert m.idx.tolist() == [9] and m.tokens['a'][:, 0, 0].tolist() == [1.] and m.out['a'][:, :, 0, 0].tolist() == [[1.], [4.]]


def test_edit_state_is_float32_for_a_half_precision_trajectory(pipe):
    """A trajectory given in bfloat16 (the networks' dtype of a half-precision run) is edited with the DDIM state in float32,
    as `edit_latents` says, and returns float32 latents. Kills: `traj[ts[0]].to(dev, torch.float32)` made `.to(dev)`."""
    g = torch.Generator().manual_seed(0)
    traj = {t: torch.randn(2, 4, 8, 8, generator=g).to(torch.bfloat16) for t in ddim_timesteps(2)}
    z = pipe.edit_latents(traj, EditConfig('add glasses', **{**TINY, 'steps': 2, 'inversion_steps': 2}))
    assert z.dtype == torch.float32 and torch.isfinite(z).all()


def test_guidance_is_float32_for_half_precision_networks():
    """bfloat16 networks, guidance 1: ε = ε_neg + 1·(ε_prompt − ε_neg) is ε_prompt itself when the guidance is taken in float32
    (the difference of two bfloat16 numbers is exact there), so the negative prompt changes nothing; in bfloat16 it rounds
    (~1e-2 here). Kills: `_cfg_eps(eps.float(), …)` made `_cfg_eps(eps, …)` in `edit_step`."""
    g = torch.Generator().manual_seed(0)
    traj = {t: torch.randn(4, 4, 8, 8, generator=g) for t in ddim_timesteps(3)}
    p = IPFaceDiffPipeline(tiny_components(0).to(dtype=torch.bfloat16), progress=False)
    cfg = lambda **k: EditConfig('add glasses', steps=3, inversion_steps=3, batch_size=2, size=64, guidance=1, **k)
    a, b = p.edit_latents(traj, cfg()), p.edit_latents(traj, cfg(negative_prompt='dark'))
    assert (a - b).abs().max() < 2e-3


# ---------------------------------------------------------------- face tracks and encoding

def test_cached_face_track_of_another_length_is_not_served(pipe, frames):
    """A track cached for 3 frames of the file is not the track of 2 frames read under the same settings: a warning and a
    2-frame track. Kills: the `len(track) == len(frames)` check of the cached track dropped."""
    f, _ = frames
    cfg = EditConfig('x', size=64, max_frames=3)
    assert not pipe.face_track(f, cfg, source=SAMPLE)[1] and pipe.face_track(f, cfg, source=SAMPLE)[1]
    with pytest.warns(UserWarning, match='face-track cache file'): t, hit = pipe.face_track(f[:2], cfg, source=SAMPLE)
    assert not hit and len(t) == 2


def test_encode_frames_refuses_a_track_of_another_length(pipe, frames):
    """3 frames with a 2-frame track: a one-line error naming both counts, not latents of the wrong faces. Kills: the
    length check of `encode_frames` dropped."""
    f, _ = frames
    track, _ = pipe.face_track(f[:2], EditConfig('x', size=64))
    one_line_error(lambda: pipe.encode_frames(f, track, 2), '3 frames', 'has 2')


# ---------------------------------------------------------------- edit's choices and warnings

def test_stream_false_never_streams(tmp_path, monkeypatch):
    """stream=False holds the frames even of a file over `STREAM_ABOVE_GB` (only None chooses). Kills: `stream is None and`
    dropped from `_stream_choice`."""
    from ipfacediff import video as V
    monkeypatch.setattr(V, 'STREAM_ABOVE_GB', 0.0)                  # every file is 'too big'
    cfg = EditConfig('x', **TINY, max_frames=2).validate()
    assert _stream_choice(None, SAMPLE, tmp_path / 'o.mp4', cfg) is True
    assert _stream_choice(False, SAMPLE, tmp_path / 'o.mp4', cfg) is False


def test_streamed_budget_counts_the_edited_frames_only(pipe, tmp_path):
    """A file whose first frame shows no face, edited streamed: frames 1–3 are edited, and the budget (as the counted UNet rows)
    is that of 3 frames, as for a held edit. Kills: the streamed result's `unet_budget(hi - lo, …)` made `unet_budget(len(frames), …)`."""
    from ipfacediff.video import write_video
    f, info = read_video(SAMPLE, max_frames=4, progress=False)
    f = f.copy(); f[0] = 128
    write_video(tmp_path / 'walk.mp4', f, info.fps, progress=False)
    cfg = EditConfig('add glasses', **TINY)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')                             # "1 of 4 frames are left unedited"
        r = pipe.edit(tmp_path / 'walk.mp4', cfg, out=tmp_path / 'o.mp4', stream=True)
    assert r.frames is None and r.span == (1, 4)
    assert r.budget == unet_budget(3, cfg) and r.unet_calls == {k: v for k, v in r.budget.items() if v}


def test_guidance_below_one_is_warned_of(pipe, frames):
    """guidance 0.5 (between 0 and 1: more negative prompt than prompt) edits, with a warning saying so. Kills: the
    warning's `cfg.guidance < 1` made `< 0`."""
    f, fps = frames
    with pytest.warns(UserWarning, match='guidance 0.5 < 1'):
        r = pipe.edit(f[:2], EditConfig('add glasses', **TINY, guidance=0.5), fps=fps)
    assert r.frames.shape == f[:2].shape


@pytest.mark.parametrize('case', ['stream', 'existing-out'])
def test_edit_video_refuses_before_loading_sd(case, tmp_path, monkeypatch):
    """edit_video(…) with no pipeline refuses what it cannot do before SD 2.1 is asked for (`from_pretrained` wrapped to
    count its calls, and called through): raw frames with stream=True ('give its path'), and an existing out= without
    overwrite. Kills: the early `_stream_choice` or `check_outputs` of `edit_video` dropped, or either put after the
    pipeline is built (as it was: offline without SD the error was SD's, not the refusal)."""
    from ipfacediff import pipeline as P
    calls, real = [], P.IPFaceDiffPipeline.from_pretrained
    monkeypatch.setattr(P.IPFaceDiffPipeline, 'from_pretrained', lambda *a, **k: calls.append(a) or real(*a, **k))
    f, out = np.zeros((2, 64, 64, 3), np.uint8), tmp_path / 'o.mp4'
    if case == 'existing-out': out.write_bytes(b'mine')
    words = 'give its path' if case == 'stream' else 'overwrite'
    try: one_line_error(lambda: P.edit_video(f, 'add glasses', out=out, fps=10, stream=case == 'stream', **TINY), words)
    finally: assert calls == []
    assert not out.exists() or out.read_bytes() == b'mine'


# ---------------------------------------------------------------- LoRA branches in one UNet

LORA = dict(r=4, lora_alpha=4, target_modules=['to_q'], init_lora_weights=False)


@pytest.fixture(scope='module')
def adapters(tmp_path_factory):
    "Two peft LoRA adapter folders (ε1: seed 20, ε2: seed 21) on the tiny UNet of seed 0."
    from peft import LoraConfig, get_peft_model
    d = tmp_path_factory.mktemp('lora')
    for i, br in enumerate(('eps1', 'eps2')):
        torch.manual_seed(20 + i)
        get_peft_model(tiny_components(0).unet, LoraConfig(**LORA)).save_pretrained(d / br)
    return d


def test_inversion_cache_follows_eps1s_adapter_not_eps2s(adapters, frames, tmp_path):
    """Both branches as adapters of one UNet: changing ε2's adapter keeps the inversion (ε1 alone inverts), changing ε1's
    recomputes it. Kills: the fingerprint's skip keeping ε2's adapter (`a.eps1` made `a.eps2`)."""
    f, fps = frames
    p = IPFaceDiffPipeline.from_components(tiny_components(0), adapters / 'eps1', adapters / 'eps2', cache_dir=tmp_path, progress=False)
    assert p.adapters is not None
    edit = lambda: p.edit(f[:2], EditConfig('add glasses', **TINY), fps=fps).cache_hit
    assert not edit() and edit()
    lora = lambda name: next(m for m in p.adapters.layers if name in m.lora_A).lora_A[name].weight
    with torch.no_grad(): lora('eps2').mul_(1.5)
    assert edit()                                                   # ε2 changed: the same inversion
    with torch.no_grad(): lora('eps1').mul_(1.5)
    assert not edit()                                               # ε1 changed: inverted again


def test_adapter_rows_refuse_rows_they_cannot_attribute(adapters):
    """A LoRA layer seeing 2 rows of a 4-row batch with 2 source rows could be ε1's rows or ε2's: a ValueError, not ε1's
    adapter on what may be ε2's rows. Kills: `n == ns and n != B - ns` made `n == ns`."""
    p = IPFaceDiffPipeline.from_components(tiny_components(0), adapters / 'eps1', adapters / 'eps2', progress=False)
    rows = p.adapters
    rows.rows = (4, 2, 'eps2')
    with pytest.raises(ValueError, match='cannot tell whose rows'): rows.runs_for(2)
    rows.rows = (6, 2, 'eps2')
    assert rows.runs_for(2) == [('eps1', slice(0, 2))] and rows.runs_for(4) == [('eps2', slice(0, 4))]
    rows.remove()


# ---------------------------------------------------------------- the edit command with --tiny

def _edit_args(*extra):
    from ipfacediff.pipeline import add_cli
    ap = argparse.ArgumentParser(); add_cli(ap.add_subparsers())
    return ap.parse_args(['edit', SAMPLE, '--prompt', 'add glasses', '--out', 'o.mp4', '--tiny', *extra])


@pytest.mark.parametrize('extra', [('--device', 'cpu'), ('--dtype', 'fp32'), ('--dtype', 'float32', '--device', 'auto')],
                         ids=['device-cpu', 'dtype-fp32', 'float32-auto'])
def test_tiny_takes_the_cpu_and_float32_it_runs_on(extra):
    """--tiny with --device cpu or --dtype fp32 asks for what it does anyway: allowed. Kills: 'cpu' or 'fp32' dropped from
    `check_tiny_flags`'s allowed values."""
    check_tiny_flags(_edit_args(*extra))
    one_line_error(lambda: check_tiny_flags(_edit_args('--device', 'cuda')), '--device')


def test_tiny_edit_builds_the_tiny_model_its_branches_were_trained_on(tmp_path, capsys):
    """`edit --tiny` with a branch fine-tuned on the tiny model of seed 1 (its config.json says so) runs on that model (its VAE,
    text encoder and base UNet), whatever --seed draws the keyframes: the edit of `IPFaceDiffPipeline.tiny(1, …)`. Kills:
    `seeds.pop() if seeds else a.seed` made `a.seed`."""
    from peft import LoraConfig, get_peft_model
    from ipfacediff.pipeline import run_edit
    br = tmp_path / 'identity'
    torch.manual_seed(0)
    get_peft_model(tiny_components(1).unet, LoraConfig(**LORA)).save_pretrained(br)
    (br / 'config.json').write_text(json.dumps({'tiny': True, 'seed': 1}))
    a = _edit_args('--identity-model', str(br), '--max-frames', '2', '--steps', '1', '--size', '64', '--batch-size', '2',
                   '--cache-dir', str(tmp_path / 'c'), '--quiet')
    a.out = str(tmp_path / 'o.mp4')
    n = torch.get_num_threads()
    try: r = run_edit(a)
    finally: torch.set_num_threads(n)
    cfg = EditConfig('add glasses', **TINY, max_frames=2)
    want = IPFaceDiffPipeline.tiny(1, identity_model=br, cache_dir=tmp_path / 'c2', progress=False).edit(SAMPLE, cfg)
    assert np.array_equal(r.crops, want.crops)
