"""Peak memory of `IPFaceDiffPipeline.invert`: the trajectory {t: z_t} it returns, and how much more the process
needed to build it. Tiny random networks on the CPU, random latents of N frames at H×H, 50 inversion steps
(all kept, as the edit reads them), frames `BATCH` at a time.

    HF_HUB_OFFLINE=1 python tools/bench_inversion_memory.py N H BATCH      # e.g. 4000 8 256

Run it once per checkout to compare (PYTHONPATH=checkout); `ru_maxrss` is the process's peak, so one run a process."""
import resource, sys, time
import torch
from ipfacediff.pipeline import IPFaceDiffPipeline, EditConfig

if __name__ == '__main__':
    n, h, batch = (int(a) for a in sys.argv[1:4])
    torch.set_num_threads(2)
    pipe = IPFaceDiffPipeline.tiny(0, progress=False)
    z0 = torch.randn(n, 4, h, h, generator=torch.Generator().manual_seed(0))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.time(); traj, _ = pipe.invert(z0, EditConfig('x', steps=50, inversion_steps=50, batch_size=batch)); dt = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mib = sum(v.numel() * v.element_size() for v in traj.values()) / 2**20
    print(f'N={n} latents {h}x{h}: {dt:.1f} s, trajectory {mib:.0f} MiB, peak RSS {peak / 1024:.0f} MiB '
          f'(before invert {before / 1024:.0f} MiB), growth {(peak - before) / 1024:.0f} MiB')
