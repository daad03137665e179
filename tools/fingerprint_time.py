"""Seconds `weights_fingerprint` takes for a randomly initialised SD 2.1 UNet (866 M weights) on this machine's CPU.
usage: python tools/fingerprint_time.py [threads]"""
import sys, time, torch
from diffusers import UNet2DConditionModel
from ipfacediff.utils import weights_fingerprint

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
unet = UNet2DConditionModel(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)
print(f'{sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M weights, {torch.get_num_threads()} threads')
for _ in range(2):
    t = time.perf_counter(); weights_fingerprint(unet); print(f'weights_fingerprint: {time.perf_counter() - t:.2f} s', flush=True)
