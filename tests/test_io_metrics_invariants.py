"""Invariants of video I/O, metrics, utils, model loading and embedders that no other test pinned down (mutation review):
each test builds a tiny input whose right answer is known by construction (frame numbers drawn into a clip, a pure
translation, hand-computed normalisation) and fails on one plausible bug."""
import os, warnings
os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
from fractions import Fraction
import av, cv2, numpy as np, pytest, torch
from PIL import Image

torch.set_num_threads(1)


# ---------------------------------------------------------------- helpers

def _ramp(n, h=32, w=48):
    "Frame i is a flat grey of level 8*i: its number can be read back from the pixels."
    return np.broadcast_to((np.arange(n) * 8 % 256).astype(np.uint8)[:, None, None, None], (n, h, w, 3)).copy()

def _ids(frames): return np.round(frames.reshape(len(frames), -1).mean(1) / 8).astype(int).tolist()

def _write_at(path, frames, first_pts_s, fps=10):
    "Lossless H.264 (no B-frames) with frame i shown at `first_pts_s + i/fps` s, millisecond timestamps."
    with av.open(str(path), 'w') as c:
        s = c.add_stream('libx264', rate=fps, options={'crf': '0', 'bframes': '0'})
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], 'yuv420p'
        s.codec_context.time_base = Fraction(1, 1000)
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format='rgb24')
            vf.pts, vf.time_base = round((first_pts_s + i / fps) * 1000), Fraction(1, 1000)
            for p in s.encode(vf): c.mux(p)
        for p in s.encode(): c.mux(p)
    return path

def _texture(h, w, seed):
    "Smooth random uint8 texture (blurred noise): well-posed for optical flow."
    n = np.random.default_rng(seed).random((h, w, 3)).astype(np.float32)
    n = cv2.GaussianBlur(n, (0, 0), 2.5)
    return np.clip((n - n.min()) / (n.max() - n.min()) * 255, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- video

def test_frames_are_timed_from_the_stream_start(tmp_path):
    "A stream whose first frame is stamped 0.3 s is read from its first frame: times count from the stream's start, as players show it."
    from ipfacediff.video import read_video
    p = _write_at(tmp_path / 'late.mp4', _ramp(30), first_pts_s=0.3)
    with av.open(str(p)) as c:                                        # the clip is what we meant: the video starts at 0.3 s
        s = c.streams.video[0]; assert abs(float(s.start_time * s.time_base) - 0.3) < 1e-3
    frames, info = read_video(p, fps=10, progress=False)
    assert _ids(frames) == list(range(30)) and info.start == 0.0      # frame k at k/10 s of the clip: frame k, not frame 0 held 3x
    frames, info = read_video(p, fps=10, start=1.0, max_frames=3, progress=False)
    assert _ids(frames) == [10, 11, 12] and info.start == 1.0         # 1 s into the clip is frame 10 (not frame 7)
    frames, info = read_video(p, progress=False)
    assert _ids(frames) == list(range(30)) and info.start == 0.0


def test_untagged_widescreen_hd_is_decoded_as_bt709(tmp_path):
    "An untagged 1280x544 (2.35:1 HD) clip is BT.709 as players assume (width >= 1280 alone makes it HD); BT.601 shifts colours."
    from ipfacediff.video import read_video
    cols = np.array([(200, 40, 40), (40, 200, 40), (40, 40, 200), (220, 170, 130)])
    chart = np.zeros((544, 1280, 3), np.uint8)
    for i, col in enumerate(cols): chart[:, i * 320:(i + 1) * 320] = col
    with av.open(str(tmp_path / 'wide.mp4'), 'w') as c:
        s = c.add_stream('libx264', rate=10); s.width, s.height, s.pix_fmt = 1280, 544, 'yuv420p'
        f = av.VideoFrame.from_ndarray(chart, format='rgb24').reformat(format='yuv420p', src_colorspace='ITU709', dst_colorspace='ITU709')
        f.colorspace, f.color_range = 2, 0                           # unspecified matrix and range: what many encoders write
        for pk in [*s.encode(f), *s.encode()]: c.mux(pk)
    got = read_video(tmp_path / 'wide.mp4', progress=False)[0][0, 272, [160 + 320 * i for i in range(4)]]
    assert np.abs(got.astype(int) - cols).max() <= 3, got


# ---------------------------------------------------------------- metrics: warp error

def test_occlusion_mask_leaves_out_the_pixels_that_enter_the_later_frame():
    "For I_{t+1} = I_t moved 6 px right with new content entering on the left, the masked warp error is ~0: the entering strip has no source in I_t."
    from ipfacediff.metrics import warp_error
    a, new = _texture(48, 64, 1), 255 - _texture(48, 64, 2)
    b = new.copy(); b[:, 6:] = a[:, :-6]                            # columns 0-5 of I_{t+1} were not in I_t
    plain, masked = warp_error(np.stack([a, b])), warp_error(np.stack([a, b]), occlusion_mask=True)
    strip = np.abs(a[:, :1].astype(np.float32) - b[:, :6]).mean() / 255   # the warp replicates column 0 of I_t there
    print(f'plain {plain:.4f}, masked {masked:.4f}, entering strip alone {strip:.3f}')
    assert plain > 0.5 * strip * 6 / 64                               # the strip dominates the plain error
    assert masked < 0.002 and masked < 0.1 * plain                   # the mask removes it: every kept pixel is exactly predicted


# ---------------------------------------------------------------- metrics: embedding cache keys

class _MeanColour(torch.nn.Module):
    "A stand-in recogniser: the mean colour of the aligned crop (deterministic, no weights)."
    def forward(self, x): return x.mean((2, 3))


@pytest.fixture(scope='module')
def astro_clip(tmp_path_factory):
    "Four 512² frames of skimage's astronaut (a real face) written at 10 fps."
    import skimage.data
    from ipfacediff.video import write_video
    d = tmp_path_factory.mktemp('astro')
    return write_video(d / 'astro.mp4', np.repeat(skimage.data.astronaut()[None], 4, 0), 10, progress=False)


def test_embedding_cache_is_keyed_by_the_read_fps(astro_clip, tmp_path):
    "Embeddings cached for a clip read at its own rate are not served for the same clip read at 5 fps (other frames)."
    from ipfacediff.metrics import EmbedStats, embed_media
    st = EmbedStats()
    full = embed_media(astro_clip, {'c': _MeanColour()}, tmp_path / 'cache', size=128, stats=st)['c']
    half = embed_media(astro_clip, {'c': _MeanColour()}, tmp_path / 'cache', size=128, fps=5, stats=st)['c']
    assert (full.n_frames, half.n_frames) == (4, 2) and (st.computed, st.cached) == (2, 0)
    again = embed_media(astro_clip, {'c': _MeanColour()}, tmp_path / 'cache', size=128, fps=5, stats=st)['c']
    assert st.cached == 1 and np.array_equal(again.frames, half.frames)


def test_embedding_cache_is_keyed_by_the_decode_rules(astro_clip, tmp_path, monkeypatch):
    "When `read_video`'s decoding rules change (DECODE_RULES bumped), embeddings cached from the old pixels are recomputed."
    import ipfacediff.video as V
    from ipfacediff.metrics import EmbedStats, embed_media
    st = EmbedStats()
    embed_media(astro_clip, {'c': _MeanColour()}, tmp_path / 'cache', size=128, stats=st)
    embed_media(astro_clip, {'c': _MeanColour()}, tmp_path / 'cache', size=128, stats=st)
    assert (st.computed, st.cached) == (1, 1)
    monkeypatch.setattr(V, 'DECODE_RULES', V.DECODE_RULES + 1)
    embed_media(astro_clip, {'c': _MeanColour()}, tmp_path / 'cache', size=128, stats=st)
    assert (st.computed, st.cached) == (2, 1)


# ---------------------------------------------------------------- utils

def test_32bit_greyscale_in_8bit_range_keeps_its_levels():
    "A mode-'I' image holding 0..255 (e.g. made from an int32 array) is 8-bit already: it keeps its levels, not divided by 257."
    from ipfacediff.utils import rgb_image
    im = Image.fromarray(np.arange(256, dtype=np.int32)[None].repeat(2, 0))
    assert im.mode == 'I'
    got = np.asarray(rgb_image(im))
    assert got.shape == (2, 256, 3) and got[0, :, 0].tolist() == list(range(256))


# ---------------------------------------------------------------- models

def test_full_unet_branch_takes_the_base_dtype(tmp_path):
    "A full-UNet branch folder saved in float32 loads in the base's dtype (float16 on a GPU): both branches run in one precision."
    from diffusers import UNet2DConditionModel
    from ipfacediff.models import load_branch
    torch.manual_seed(0)
    u = UNet2DConditionModel(block_out_channels=(8, 8), norm_num_groups=4, down_block_types=('DownBlock2D',) * 2,
                             up_block_types=('UpBlock2D',) * 2, layers_per_block=1, sample_size=8, cross_attention_dim=8)
    u.save_pretrained(tmp_path / 'full')                              # float32 on disk
    for dt in (torch.float16, torch.bfloat16):
        base = UNet2DConditionModel.from_pretrained(tmp_path / 'full', torch_dtype=dt)
        m = load_branch(tmp_path / 'full', base, 'ε2')
        assert {p.dtype for p in m.parameters()} == {dt}, dt
        assert torch.equal(m.conv_in.weight, base.conv_in.weight)


# ---------------------------------------------------------------- embedders

@pytest.fixture(scope='module')
def first_channel_profile(tmp_path_factory):
    "A TorchScript 'recogniser' returning the column profile (mean over rows) of its input's first channel."
    class FirstChannel(torch.nn.Module):
        def forward(self, x): return x[:, 0].mean(1)
    p = tmp_path_factory.mktemp('ts') / 'first.pt'
    with warnings.catch_warnings():                                   # torch >= 2.10 calls TorchScript deprecated; it still works
        warnings.simplefilter('ignore', DeprecationWarning)
        torch.jit.script(FirstChannel()).save(str(p))
    return p


def _identity16():
    from ipfacediff.embedders import AlignedCrop
    return AlignedCrop(16, 32.0, (255.5, 255.5))   # scale·size/512 = 1, centre at the frame's centre: the sampling grid is the pixels


def test_torchscript_bgr_feeds_blue_first(first_channel_profile):
    "With bgr=True the network's first channel is the image's blue (VGGFace's convention), then (255·x − mean)/std in the network's channel order."
    from ipfacediff.embedders import TorchScriptEmbedder
    x = torch.zeros(1, 3, 16, 16)
    x[:, 0], x[:, 1] = 0.2, 0.5
    x[:, 2] = torch.arange(16.) / 15                                  # blue: a left-to-right ramp
    e = TorchScriptEmbedder(first_channel_profile, _identity16(), mean=(10., 20., 30.), std=(2., 4., 8.), bgr=True)
    with torch.no_grad(): got = e.embed(x)[0]
    want = (255 * torch.arange(16.) / 15 - 10) / 2                    # blue, with the first (network-order) mean and std
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    rgb = TorchScriptEmbedder(first_channel_profile, _identity16(), mean=(10., 20., 30.), std=(2., 4., 8.), bgr=False)
    with torch.no_grad(): torch.testing.assert_close(rgb.embed(x)[0], torch.full((16,), (51. - 10) / 2), atol=1e-4, rtol=1e-5)


def test_recogniser_fingerprint_follows_its_crop(first_channel_profile):
    "Two recognisers with the same weights but different crops embed different pixels: their fingerprints (cache keys) differ."
    from ipfacediff.embedders import AlignedCrop, TorchScriptEmbedder
    a = TorchScriptEmbedder(first_channel_profile, _identity16())
    b = TorchScriptEmbedder(first_channel_profile, AlignedCrop(16, 16.0, (255.5, 300.0)))
    c = TorchScriptEmbedder(first_channel_profile, _identity16())
    assert a.fingerprint() == c.fingerprint() and a.fingerprint() != b.fingerprint()


def test_dlib_native_fixed_box_scales_with_the_crop():
    "Without detection, dlib-native places its fixed FFHQ face box in proportion to the crop: at 1024² it is twice the 512² box."
    import skimage.data
    from ipfacediff.embedders import DlibNativeEmbedder, FFHQ_FACE_BOX, detect_and_align
    face = detect_and_align(skimage.data.astronaut()).aligned                       # a real FFHQ-aligned 512² face
    big = cv2.resize(face, (1024, 1024), interpolation=cv2.INTER_CUBIC)
    emb = DlibNativeEmbedder(detect=False)
    rects, sp5 = [], emb._m['sp5']
    emb._m = {**emb._m, 'sp5': lambda im, r: rects.append((r.left(), r.top(), r.right(), r.bottom())) or sp5(im, r)}  # a spy
    to_t = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255
    e512, e1024 = emb(to_t(face)), emb(to_t(big))
    assert rects == [FFHQ_FACE_BOX, tuple(2 * v for v in FFHQ_FACE_BOX)]
    assert float((e512 * e1024).sum()) > 0.98                         # the same face gives the same identity
