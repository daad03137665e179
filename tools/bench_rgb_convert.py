"Time read_video's YUV → RGB conversion on one 1080p frame: swscale's fast defaults against the exact flags read_video uses (BENCHMARKS.md)."
import time, numpy as np, av
from av.video.reformatter import Interpolation as I
img = np.random.default_rng(0).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
f = av.VideoFrame.from_ndarray(img, format='rgb24').reformat(format='yuv420p')
flags = {'fast (before)': {}, 'exact (now)': dict(interpolation=I.BILINEAR | I.ACCURATE_RND | I.FULL_CHR_H_INT)}
ts = {k: [] for k in flags}
for _ in range(30):                              # interleaved, so both see the same load
    for k, kw in flags.items():
        t = time.perf_counter(); f.to_ndarray(format='rgb24', **kw); ts[k].append(time.perf_counter() - t)
med = {k: 1000 * float(np.median(v)) for k, v in ts.items()}
print(', '.join(f'{k}: {v:.1f} ms' for k, v in med.items()), f'ratio {med["exact (now)"] / med["fast (before)"]:.1f}')
