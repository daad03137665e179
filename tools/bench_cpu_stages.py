"""Seconds per frame of the CPU stages of an edit on the sample clip: `track_faces` on 1 thread and on all CPUs
(at 640×360 and upscaled to 1280×720), and align / paste-back / H.264 writing with OpenCV's and libx264's own
threads against one thread.

    python tools/bench_cpu_stages.py      # medians of 3 interleaved runs, and the speed-ups
"""
import os, statistics, tempfile, time
from pathlib import Path
import cv2, numpy as np
from ipfacediff.faces import align_faces, paste_back, track_faces
from ipfacediff.utils import cpu_workers, data_path
from ipfacediff.video import read_video, write_video

def median_s_per_frame(fn, n_frames, settings):
    "{setting: median s/frame over 3 rounds}, the settings interleaved within each round."
    times = {s: [] for s in settings}
    for _ in range(3):
        for s in settings:
            t = time.perf_counter(); fn(s); times[s].append((time.perf_counter() - t) / n_frames)
    return {s: statistics.median(v) for s, v in times.items()}

frames, _ = read_video(data_path('sample.mp4'), progress=False)
hd = np.stack([cv2.resize(f, (1280, 720), interpolation=cv2.INTER_CUBIC) for f in frames])
n, n_cv = cpu_workers(), cv2.getNumThreads()
track = track_faces(frames, workers=n, progress=False)        # also loads the models and fills the detector pool
print(f'{n} CPUs; load average {os.getloadavg()[0]:.2f}')
for name, clip in (('640x360', frames), ('1280x720', hd)):
    m = median_s_per_frame(lambda w: track_faces(clip, workers=w, progress=False), len(clip), (1, n))
    print(f'track {name}: s/frame 1 thread {m[1]:.4f}, {n} threads {m[n]:.4f}, speed-up {m[1] / m[n]:.2f}')

crops = align_faces(frames, track, progress=False)
def with_cv_threads(k, fn): cv2.setNumThreads(k); fn()
for name, fn in (('align 512²', lambda: align_faces(frames, track, progress=False)),
                 ('paste-back 512²', lambda: paste_back(frames, crops[:, ::-1], track, progress=False))):
    m = median_s_per_frame(lambda k: with_cv_threads(k, fn), len(frames), (1, n_cv))
    print(f'{name}: s/frame OpenCV 1 thread {m[1]:.4f}, {n_cv} threads {m[n_cv]:.4f}')
cv2.setNumThreads(n_cv)

import av
def write(threads, path):
    "The sample clip as H.264 with libx264 on `threads` threads (0: its own choice, as `write_video` leaves it)."
    with av.open(str(path), 'w') as c:
        vs = c.add_stream('libx264', rate=10, options={'crf': '18', 'preset': 'medium'})
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], 'yuv420p'
        vs.codec_context.thread_count = threads
        for f in frames:
            for p in vs.encode(av.VideoFrame.from_ndarray(f, format='rgb24')): c.mux(p)
        for p in vs.encode(): c.mux(p)
with tempfile.TemporaryDirectory() as d:
    m = median_s_per_frame(lambda k: write(k, Path(d) / f'{k}.mp4'), len(frames), (1, 0))
    w = median_s_per_frame(lambda _: write_video(Path(d) / 'w.mp4', frames, 10, overwrite=True, progress=False), len(frames), (0,))
print(f'write 640x360: s/frame libx264 1 thread {m[1]:.4f}, its default {m[0]:.4f}; write_video {w[0]:.4f}')
print(f'load average {os.getloadavg()[0]:.2f}')
