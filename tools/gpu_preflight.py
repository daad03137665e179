"""CPU checks of what would waste the GPU session's device time (30 minutes, 10 per call) if it failed there.

    python tools/gpu_preflight.py activations   # ~1.5 min, ~7 GB, one core
    python tools/gpu_preflight.py inductor      # ~4 min, one core (C++ code generation)
    python tools/gpu_preflight.py recompiles    # ~6 min, one core

`activations`: the largest |activation| of every module of the random SD 2.1 networks that `ipfacediff bench
--config sd21` uses, in float32 at 512² (one text encoding, VAE encode, UNet forward, VAE decode). float16
overflows above 65504, so this says whether the GPU run's float16 copy of the same weights can stay finite.

`inductor`: the tiny pipeline's editing loop with `optimize(channels_last=True, compile=True)` — torch.compile's
default inductor backend, which the `--compile` benchmark uses — against eager: same latents, how many blocks
compiled, graph breaks, compile time (the first run) and the compiled run's time.

`recompiles`: a compiled tiny pipeline (inductor), warmed up as `bench` once did (a 1-step edit of 8 frames) and as it
does now (a `warmup_steps(cfg)`-step edit of the timed frame count: 7 of the 10 steps), then two timed 10-step 40-frame
edits: graphs compiled inside each timed run.
"""
import sys, time
import torch

def activations(seed: int = 0, size: int = 512) -> float:
    from ipfacediff.bench import sd21_components
    c = sd21_components('cpu', torch.float32, seed=seed)
    peak: dict[str, float] = {}
    def hook(name):
        def f(module, args, out):
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if torch.is_tensor(t) and t.is_floating_point(): peak[name] = max(peak.get(name, 0.0), t.abs().max().item())
        return f
    for net, mod in (('text', c.text_encoder), ('unet', c.unet), ('vae', c.vae)):
        for n, m in mod.named_modules():
            if n: m.register_forward_hook(hook(f'{net}.{n}'))
    t0 = time.time()
    with torch.no_grad():
        ids = c.tokenizer(['a photo of a face'], padding='max_length', max_length=77, return_tensors='pt').input_ids
        cond = c.text_encoder(ids)[0]
        g = torch.Generator().manual_seed(seed)
        z = c.vae.encode(torch.rand(1, 3, size, size, generator=g) * 2 - 1).latent_dist.mean * c.vae.config.scaling_factor
        eps = c.unet(torch.randn(z.shape, generator=g), 981, encoder_hidden_states=cond).sample
        y = c.vae.decode(z / c.vae.config.scaling_factor).sample
    finite = bool(torch.isfinite(eps).all() and torch.isfinite(y).all())
    print(f'{size}², seed {seed}: {time.time() - t0:.0f} s; float32 outputs finite: {finite}')
    for net in ('text', 'unet', 'vae'):
        k = max((n for n in peak if n.startswith(net + '.')), key=peak.get)
        print(f'{net:4s}: largest |activation| {peak[k]:.4g} ({k})')
    top, fp16 = max(peak.values()), torch.finfo(torch.float16).max
    print(f"largest overall {top:.4g}: {fp16 / top:.0f}x below float16's largest value {fp16:.0f}")
    return top

def inductor():
    import torch._dynamo.utils as du
    from ipfacediff.pipeline import IPFaceDiffPipeline, EditConfig
    from ipfacediff.ddim import ddim_timesteps
    gen = torch.Generator().manual_seed(0)
    traj = {t: torch.randn(16, 4, 8, 8, generator=gen) for t in ddim_timesteps(3)}
    cfg = EditConfig('add glasses', steps=3, inversion_steps=3, batch_size=2, size=64, keyframe_window=None)
    t0 = time.time(); ref = IPFaceDiffPipeline.tiny(0, progress=False).edit_latents(traj, cfg); eager = time.time() - t0
    fast = IPFaceDiffPipeline.tiny(0, progress=False).optimize(channels_last=True, compile=True)
    print(f'eager: {eager:.1f} s')
    for i in range(2):
        t0 = time.time(); z = fast.edit_latents(traj, cfg)
        print(f'inductor run {i}: {time.time() - t0:.1f} s, {len(fast.compiled)} compiled blocks, max |Δ| vs eager {(z - ref).abs().max():.2e}')
    print('dynamo:', dict(du.counters['stats']), 'graph breaks:', dict(du.counters['graph_break']) or 'none')

def recompiles(frames: int = 40):
    import torch._dynamo, torch._dynamo.utils as du
    from ipfacediff.bench import make_pipeline, sample_frames, replace_cfg, warmup_steps
    from ipfacediff.pipeline import EditConfig
    cfg = EditConfig('add sunglasses and a beard', size=128, steps=10, inversion_steps=10, keyframe_window=8).validate()
    clip, fps = sample_frames(frames)
    graphs = lambda: du.counters['stats']['unique_graphs']
    w = warmup_steps(cfg)
    for name, n, steps in (('1-step edit of 8 frames', 8, 1), (f'{w}-step edit of {frames} frames', frames, w)):
        torch._dynamo.reset()
        pipe = make_pipeline('tiny', 'cpu', None, 'shared', True, True, 0)
        t0, g0 = time.time(), graphs()
        pipe.edit(clip[:n], replace_cfg(cfg, steps=steps, inversion_steps=steps), fps=fps)
        print(f'warm-up, {name}: {time.time() - t0:.1f} s, {graphs() - g0} graphs')
        for i in range(2):
            t0, g0 = time.time(), graphs(); pipe.edit(clip[:frames], cfg, fps=fps)
            print(f'  timed {cfg.steps}-step {frames}-frame edit {i}: {time.time() - t0:.1f} s, {graphs() - g0} graphs compiled inside it')

if __name__ == '__main__':
    torch.set_num_threads(1)
    what = sys.argv[1] if len(sys.argv) > 1 else ''
    if what not in ('activations', 'inductor', 'recompiles'): sys.exit(__doc__)
    {'activations': activations, 'inductor': inductor, 'recompiles': recompiles}[what]()
