"""Fine-tuning invariants (ipfacediff.finetune): what is logged, clipped, inverted, cached, kept and resumed, and eq. 6's direction.

Tiny random SD + tiny CLIP on two real face crops at 64 px, a few steps each; the whole file runs in well under 40 s on 2 cores."""
import json, os, shutil
import pytest, torch

os.environ.setdefault('HF_HUB_OFFLINE', '1')
import ipfacediff.finetune as FT
from ipfacediff.facedata import demo_faces
from ipfacediff.finetune import FinetuneConfig, Finetuner, _checkpoints, collate_faces, read_log
from ipfacediff.models import encode_prompt
from ipfacediff.cli import main

BASE = dict(mode='directional', tiny=True, size=64, batch_size=2, inversion_steps=10, rank=4, lr=2e-3, checkpoint_every=100)

@pytest.fixture(scope='module')
def faces(tmp_path_factory):
    return demo_faces(tmp_path_factory.mktemp('faces'), size=64, n_video=0)

def _ft(faces, out, **kw):
    folder, caps = faces
    return Finetuner(FinetuneConfig(data=str(folder), captions=str(caps), out=str(out), **{**BASE, **kw}))

def _cli_args(faces, out):
    folder, caps = faces
    return ['finetune', 'directional', '--data', str(folder), '--captions', str(caps), '--out', str(out), '--tiny', '--steps', '3',
            '--grad-accum', '2', '--checkpoint-every', '1', '--keep-checkpoints', '2', '--fixed-t', '201', '--no-progress']

@pytest.fixture(scope='module')
def cli_run(faces, tmp_path_factory):
    "`ipfacediff finetune directional --tiny` with 2 micro-batches per step, every step checkpointed; the loss of every micro-batch recorded."
    out, losses, real = tmp_path_factory.mktemp('cli') / 'run', [], Finetuner.loss
    def spy(self, *a, **k):
        loss, parts = real(self, *a, **k)
        losses.append(loss.item())
        return loss, parts
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Finetuner, 'loss', spy)
        assert main(_cli_args(faces, out)) == 0
    return out, losses

@pytest.fixture(scope='module')
def trained(faces, tmp_path_factory):
    "Two 3-step LoRA ε2 runs over t ∈ {101, 201}, alike but for --cache-inversions; the uncached one records its gradient norms and one x_t before and after."
    runs = {cache: _ft(faces, tmp_path_factory.mktemp('run') / 'r', steps=3, t_min=101, t_max=201, lora_alpha=8, max_grad_norm=1e-4,
                       cache_inversions=cache) for cache in (False, True)}
    ft = runs[False]
    params, norms, real_step = [p for p in ft.unwrapped.parameters() if p.requires_grad], [], ft.optimizer.step
    def step(*a, **k):
        norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])).item())
        return real_step(*a, **k)
    ft.optimizer.step = step
    b = collate_faces([ft.dataset[0], ft.dataset[1]])
    x_t = lambda: ft._x_t(b['image'], encode_prompt(ft.comps, b['caption']).float(), 201, b['index'], None)
    before = x_t()
    rows = {cache: r.train(progress=False) for cache, r in runs.items()}
    return dict(runs=runs, rows=rows, norms=norms, x_t=(before, x_t()))

def test_logged_loss_is_the_mean_over_accumulated_microbatches(cli_run):
    "Each log.csv row's loss is the mean of its grad_accum micro-batch losses, so logs compare across --grad-accum settings."
    out, losses = cli_run
    rows = read_log(out)
    assert len(losses) == 6 and [r['step'] for r in rows] == [1, 2, 3]
    assert [r['loss'] for r in rows] == pytest.approx([(losses[2 * k] + losses[2 * k + 1]) / 2 for k in range(3)], rel=1e-9)

def test_only_the_last_keep_checkpoints_survive(cli_run):
    "--keep-checkpoints 2 leaves exactly the two newest checkpoints on disk: older ones are deleted, no more and no fewer."
    out, _ = cli_run
    assert [c.name for c in _checkpoints(out)] == ['step_000002', 'step_000003']

def test_resume_refuses_another_grad_accum(faces, cli_run, tmp_path, capsys):
    "A run resumed with another --grad-accum is refused: it would change the effective batch and the data order mid-run."
    out, _ = cli_run
    shutil.copytree(out, tmp_path / 'run')
    capsys.readouterr()
    assert main(_cli_args(faces, tmp_path / 'run') + ['--resume', '--grad-accum', '1']) == 2
    assert 'different settings (grad_accum=2)' in capsys.readouterr().err

def test_t_max_is_a_drawable_timestep(faces, tmp_path):
    "t is drawn from the DDIM grid points in [t_min, t_max] with both ends included: --t-min 201 --t-max 201 trains at t = 201."
    rows = _ft(faces, tmp_path / 'r', steps=1, t_min=201, t_max=201).train(progress=False)
    assert [r['t'] for r in rows] == [201]

def test_gradients_are_clipped_to_max_grad_norm(trained):
    "Every optimizer step sees gradients of total norm max_grad_norm at most (here they are larger, so exactly it)."
    assert len(trained['norms']) == 3
    assert trained['norms'] == pytest.approx([1e-4] * 3, rel=1e-3)

def test_ddim_inversion_uses_the_frozen_base(trained):
    "x_t comes from DDIM inversion with the frozen base ε (LoRA adapters off): training the adapters leaves it bitwise unchanged."
    ft = trained['runs'][False]
    assert any(v.abs().max() > 0 for k, v in ft.unwrapped.state_dict().items() if 'lora_B' in k)
    before, after = trained['x_t']
    assert torch.equal(before, after)

def test_cached_inversions_match_fresh_ones(trained):
    "--cache-inversions keeps x_t per image and t: a run with it logs the losses of a run without, though t changes between steps."
    fresh, cached = trained['rows'][False], trained['rows'][True]
    assert [r['t'] for r in fresh] == [r['t'] for r in cached] and len({r['t'] for r in fresh}) == 2
    assert [r['loss'] for r in cached] == pytest.approx([r['loss'] for r in fresh], rel=1e-4)

def test_lora_alpha_sets_the_adapter_scale(trained):
    "lora_alpha reaches the adapters (scale alpha / rank) and the saved adapter_config.json that load_branch reads."
    ft = trained['runs'][False]
    assert {m.scaling['default'] for m in ft.unwrapped.modules() if hasattr(m, 'scaling')} == {2.0}
    c = json.loads((ft.out / 'adapter_config.json').read_text())
    assert (c['r'], c['lora_alpha']) == (4, 8)

@pytest.fixture(scope='module')
def directional_call(trained):
    "One eq. 6 loss of a batch at t = 201, recording the prompt pairs drawn, the ΔT handed to the loss and the UNet's conditioning."
    ft, seen, conds = trained['runs'][False], {}, []
    sample, loss = ft.prompts.sample, FT.directional_clip_loss
    def spy_sample(*a, **k):
        seen['prompts'] = sample(*a, **k)
        return seen['prompts']
    def spy_loss(*a, **k):
        seen['delta_t'] = k['delta_t']
        return loss(*a, **k)
    h = ft.unwrapped.register_forward_pre_hook(lambda m, a, k: conds.append((torch.is_grad_enabled(), k['encoder_hidden_states'].detach())), with_kwargs=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ft.prompts, 'sample', spy_sample); mp.setattr(FT, 'directional_clip_loss', spy_loss)
        try: ft.loss(collate_faces([ft.dataset[0], ft.dataset[1]]), 201, torch.Generator().manual_seed(0))
        finally: h.remove()
    return ft, seen, conds

def test_edit_direction_points_from_reference_to_target(directional_call):
    "Eq. 6's ΔT is norm(f_T(p_tar) − f_T(p_ref)): pointing from the reference caption to the edit prompt, not back."
    ft, seen, _ = directional_call
    tar, ref = seen['prompts']
    n = lambda x: x / x.norm(dim=-1, keepdim=True)
    with torch.no_grad(): want = n(n(ft.clip.encode_text(tar)) - n(ft.clip.encode_text(ref)))
    torch.testing.assert_close(seen['delta_t'], want, atol=1e-6, rtol=1e-5)

def test_eps2_is_conditioned_on_the_target_prompt(directional_call):
    "ε2 generates ŷ conditioned on p_tar (the edit prompt), not on the reference caption it was inverted with."
    ft, seen, conds = directional_call
    tar, ref = seen['prompts']
    gen = [c for grad, c in conds if grad]
    assert len(gen) == 1 and tar != ref
    torch.testing.assert_close(gen[0], encode_prompt(ft.comps, tar).float())
