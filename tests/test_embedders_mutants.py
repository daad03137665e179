"""Invariants of `ipfacediff.embedders` that no other test pinned down (mutation review of the face recognisers: each
test fails on at least one code change that the notebook's checks and the rest of tests/ let through). What they pin:
an embedder built from a network in training mode is put in eval mode (ArcFace, TorchScript), so a face's vector does
not depend on the batch; the iresnet applies its final bn2 before the fc (arcface_torch's forward); an explicit
`arch=` is the depth built, and a checkpoint without a layer group or without `fc.weight` is a one-line "not an
arcface_torch iresnet" error; vectors come out float32 whatever the network's dtype; a TorchScript recogniser that
returns `(B, D, 1, 1)` gives `(B, D)`; a `.ONNX` file (any case) goes to the ONNX backend; the ONNX backend (real onnxruntime sessions of tiny
exported models) feeds `(255·x − mean)/std` in BGR when asked, runs a batch-1 model one face at a
time, flattens `(B, D, 1, 1)` outputs and keys its fingerprint on the model file's bytes; dlib's `.dat` reader reads
negative packed ints and refuses a file with the wrong number of layers or a layer of the wrong stride instead of
loading random weights; dlib-native hands dlib the exact uint8 pixels (rounded, overshoot clamped, not wrapped) and the
largest detection, and its fingerprint follows `detect`; `detect_and_align`'s rectangle is dlib's inclusive one;
`demo_faces` labels obama2/obama3 as the person obama; `fetch_face_recognition_images` downloads when any photo is
missing and refreshes the cached photos' time of last use. Tiny random components, dlib's real models, offline, one core."""
import os, time, warnings

os.environ.setdefault('HF_HUB_OFFLINE', '1')
import numpy as np
import pytest
import torch

from ipfacediff import embedders as E
from ipfacediff.utils import UserError

torch.set_num_threads(1)
from shared import one_line_error


def _iresnet(features=16, layers=(1, 1, 1, 1), train=False):
    "A small random iresnet with non-trivial batch-norm statistics (eval mode unless `train`)."
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = E.IResNet(layers, features)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.2, 0.2); m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5); m.bias.data.uniform_(-0.2, 0.2)
    return net.train(train)


def _faces(n=3, side=128, seed=0):
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _identity16():
    return E.AlignedCrop(16, 32.0, (255.5, 255.5))   # the 16² sampling grid is the pixels of a 16² face


def _flat(rgb, n=16, b=1):
    return torch.tensor(rgb, dtype=torch.float32)[None, :, None, None].expand(b, 3, n, n).contiguous()


def _script(module, path):
    with warnings.catch_warnings():                  # torch >= 2.10 calls TorchScript deprecated; it still works
        warnings.simplefilter('ignore', DeprecationWarning)
        torch.jit.script(module).save(str(path))
    return path


# ---------------------------------------------------------------- ArcFace / iresnet

def test_arcface_from_a_training_mode_network_is_frozen_in_eval_mode():
    "A network handed over in training mode is put in eval mode: no trainable weights, and a face's vector does not depend on its batch."
    arc = E.ArcFaceEmbedder(model=_iresnet(train=True))
    assert not arc.training and not arc.net.training and not any(p.requires_grad for p in arc.parameters())
    x = _faces()
    with torch.no_grad(): torch.testing.assert_close(arc(x[:1]), arc(x)[:1], atol=1e-5, rtol=0)


def test_iresnet_forward_is_arcface_torchs():
    "conv1 → bn1 → prelu → layer1..4 → bn2 → flatten → dropout → fc → features, as arcface_torch's iresnet (bn2 included)."
    net = _iresnet()
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        h = net.layer4(net.layer3(net.layer2(net.layer1(net.prelu(net.bn1(net.conv1(x)))))))
        want = net.features(net.fc(torch.flatten(net.bn2(h), 1)))
        torch.testing.assert_close(net(x), want, atol=1e-5, rtol=1e-5)


def test_arcface_explicit_arch_is_the_depth_built(tmp_path):
    "arch='r18' builds an iresnet-18 that takes an iresnet-18 checkpoint (it is not ignored in favour of another depth)."
    torch.save(_iresnet(layers=E.IRESNET_LAYERS['r18']).state_dict(), tmp_path / 'r18.pth')
    arc = E.get_embedder('arcface', weights=tmp_path / 'r18.pth', arch='r18')
    assert [len(getattr(arc.net, f'layer{i}')) for i in range(1, 5)] == list(E.IRESNET_LAYERS['r18'])


@pytest.mark.parametrize('drop', ['layer4.', 'fc.weight'])
def test_arcface_checkpoint_missing_a_part_is_not_an_iresnet(tmp_path, drop):
    "A checkpoint without a layer group or without fc.weight is refused in one line as not an arcface_torch backbone."
    sd = {k: v for k, v in _iresnet().state_dict().items() if not k.startswith(drop)}
    torch.save(sd, tmp_path / 'b.pth')
    one_line_error(lambda: E.get_embedder('arcface', weights=tmp_path / 'b.pth'), 'not an arcface_torch iresnet backbone')


def test_vectors_are_float32_whatever_the_networks_dtype():
    "A float64 network on float64 faces still gives float32 unit vectors (the cache and the metrics store float32)."
    arc = E.ArcFaceEmbedder(model=_iresnet().double())
    with torch.no_grad(): v = arc(_faces(2).double())
    assert v.dtype == torch.float32 and torch.allclose(v.norm(dim=1), torch.ones(2), atol=1e-5)


# ---------------------------------------------------------------- TorchScript

def test_torchscript_from_a_training_mode_network_is_frozen_in_eval_mode(tmp_path):
    "A TorchScript network saved in training mode is put in eval mode and frozen."
    ts = E.TorchScriptEmbedder(_script(_iresnet(train=True), tmp_path / 'train.pt'), E.ARCFACE_CROP)
    assert not ts.net.training and not any(p.requires_grad for p in ts.parameters())
    x = _faces()
    with torch.no_grad(): torch.testing.assert_close(ts(x[:1]), ts(x)[:1], atol=1e-5, rtol=0)


class _KeepDimMeans(torch.nn.Module):
    def forward(self, x): return x.mean((2, 3), keepdim=True)     # (B, 3, 1, 1), as a conv head without flatten gives


def test_torchscript_output_of_shape_b_d_1_1_is_flattened(tmp_path):
    "A recogniser returning (B, D, 1, 1) gives (B, D) vectors, normalised over D."
    ts = E.TorchScriptEmbedder(_script(_KeepDimMeans(), tmp_path / 'k.pt'), _identity16(), mean=0., std=1.)
    v = ts(_flat((0.2, 0.4, 0.8), b=2))
    assert ts.dim == 3 and v.shape == (2, 3)
    torch.testing.assert_close(v[0], torch.tensor([0.2, 0.4, 0.8]) / np.linalg.norm([0.2, 0.4, 0.8]), atol=1e-5, rtol=0)


def test_onnx_suffix_in_any_case_goes_to_the_onnx_backend(tmp_path, monkeypatch):
    "recognizer_from_path sends model.ONNX to the ONNX backend, as model.onnx."
    calls = []
    monkeypatch.setattr(E, 'OnnxEmbedder', lambda p, **kw: calls.append(p) or 'onnx')
    (tmp_path / 'model.ONNX').write_bytes(b'onnx bytes')
    assert E.recognizer_from_path('cosface', tmp_path / 'model.ONNX') == 'onnx' and calls == [tmp_path / 'model.ONNX']


# ---------------------------------------------------------------- ONNX (real onnxruntime sessions of tiny exported models)

def _export(module, path, batch1=False):
    "`module` as an ONNX file taking (n, 3, 16, 16) faces, or exactly one face when `batch1` (as some recognisers are exported)."
    pytest.importorskip('onnx'); pytest.importorskip('onnxruntime')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(module, (torch.zeros(1, 3, 16, 16),), str(path), dynamo=False, input_names=['data'], output_names=['emb'],
                          dynamic_axes=None if batch1 else {'data': {0: 'n'}})
    return path


def test_onnx_feeds_bgr_scaled_pixels_one_face_at_a_time(tmp_path):
    "bgr=True feeds (255·x − mean)/std with blue first; a batch-1 model is run face by face (onnxruntime refuses a batch); (B, D, 1, 1) out is (B, D)."
    ox = E.OnnxEmbedder(_export(_KeepDimMeans(), tmp_path / 'batch1.onnx', batch1=True), crop=_identity16(),
                        mean=(10., 20., 30.), std=(2., 4., 8.), bgr=True)
    assert ox._batch1 and ox.dim == 3 and not ox.differentiable
    rgb = ((0.2, 0.4, 0.8), (0.1, 0.3, 0.5), (0.6, 0.0, 1.0))
    x = torch.cat([_flat(c) for c in rgb])
    with torch.no_grad(): got = ox.embed(x)
    want = torch.tensor([[(b * 255 - 10) / 2, (g * 255 - 20) / 4, (r * 255 - 30) / 8] for r, g, b in rgb])
    assert got.shape == (3, 3) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    assert ox(x).shape == (3, 3)


class _Scaled(torch.nn.Module):
    def __init__(self, k): super().__init__(); self.register_buffer('k', torch.full((3,), float(k)))
    def forward(self, x): return x.mean((2, 3)) * self.k


def test_onnx_fingerprint_follows_the_model_files_bytes(tmp_path):
    "Two ONNX models of other weights have other fingerprints; a copy of the same file, the same fingerprint."
    a, b = _export(_Scaled(1), tmp_path / 'a.onnx'), _export(_Scaled(2), tmp_path / 'b.onnx')
    (tmp_path / 'c.onnx').write_bytes(a.read_bytes())
    fa, fb, fc = (E.OnnxEmbedder(tmp_path / n, crop=_identity16()).fingerprint() for n in ('a.onnx', 'b.onnx', 'c.onnx'))
    assert fa == fc and fa != fb


# ---------------------------------------------------------------- dlib's .dat

def _pint(v: int) -> bytes:
    "dlib's packed int: a header byte (byte count, 0x80 for negative) then the magnitude, little endian."
    n = max(1, (abs(v).bit_length() + 7) // 8)
    return bytes([n | (0x80 if v < 0 else 0)]) + abs(v).to_bytes(n, 'little')


def _tensor(a) -> bytes:
    a = np.asarray(a, '<f4').ravel()
    return _pint(2) + b''.join(_pint(v) for v in (a.size, 1, 1, 1)) + a.tobytes()


def _dat(net, skip_conv=None, stride_of=None) -> bytes:
    "A dlib-format .dat of `net`'s weights (layers in forward order); `skip_conv` leaves one conv out, `stride_of` gives one conv stride 1."
    convs = [net.conv0] + [c for b in net.blocks for c in (b.conv1, b.conv2)]
    affs = [net.aff0] + [a for b in net.blocks for a in (b.aff1, b.aff2)]
    out = []
    for i, c in enumerate(convs):
        if i == skip_conv: continue
        nf, _, nr, nc = c.weight.shape
        s = 1 if i == stride_of else c.stride[0]
        out.append(b'\x01\x05con_4' + _tensor(np.concatenate([c.weight.detach().numpy().ravel(), c.bias.detach().numpy()]))
                   + b''.join(_pint(v) for v in (nf, nr, nc, s, s, c.padding[0], c.padding[0])))
    for a in affs:
        out.append(b'\x01\x07affine_' + _tensor(np.concatenate([a.weight.detach().numpy(), a.bias.detach().numpy()])))
    out.append(b'\x01\x04fc_2' + _pint(128) + _pint(256) + _tensor(net.fc.weight.detach().numpy().T))
    return b''.join(out)


@pytest.fixture(scope='module')
def dlib_like():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return E.DlibResNet()


def test_dlib_packed_ints_keep_their_sign():
    "A header byte with 0x80 set is a negative number; the low nibble is the byte count."
    assert E._unpack_int(bytes([0x81, 5]), 0) == (-5, 2)
    assert E._unpack_int(bytes([0x02, 0x34, 0x12, 0x99]), 0) == (0x1234, 3)


def test_a_dat_of_dlibs_layout_loads_its_weights(tmp_path, dlib_like):
    "A file in dlib's format with the ResNet-29 layout loads exactly its weights (the writer above is dlib's format)."
    (tmp_path / 'ok.dat').write_bytes(_dat(dlib_like))
    net = E.DlibResNet.from_dat(tmp_path / 'ok.dat')
    for a, b in zip(net.state_dict().values(), dlib_like.state_dict().values()): assert torch.equal(a, b)


def test_a_layer_name_inside_float_data_is_skipped(tmp_path, dlib_like):
    "A layer-name byte pattern not followed by a version-2 tensor (e.g. inside float data) is not read as a layer."
    bogus = b'\x01\x05con_4' + _pint(3) + b''.join(_pint(v) for v in (4, 1, 1, 1)) + np.zeros(4, '<f4').tobytes() \
        + b''.join(_pint(v) for v in (1, 1, 1, 1, 1, 0, 0))
    (tmp_path / 'noisy.dat').write_bytes(bogus + _dat(dlib_like))
    net = E.DlibResNet.from_dat(tmp_path / 'noisy.dat')
    assert torch.equal(net.conv0.weight, dlib_like.conv0.weight)


@pytest.mark.parametrize('bad,why', [(dict(skip_conv=28), "is not dlib's"), (dict(stride_of=7), 'unexpected layer')])
def test_a_dat_of_another_layout_is_refused(tmp_path, dlib_like, bad, why):
    "One conv layer too few, or a downsampling conv of stride 1, is a one-line error, not a network with random or misplaced weights."
    (tmp_path / 'bad.dat').write_bytes(_dat(dlib_like, **bad))
    one_line_error(lambda: E.get_embedder('dlib', weights=tmp_path / 'bad.dat'), why)


# ---------------------------------------------------------------- dlib-native (dlib's real models)

def _descriptor(models, im, rect):
    "dlib's descriptor of the face in `rect` of the uint8 RGB image `im`, computed directly."
    return np.array(models['rec'].compute_face_descriptor(im, models['sp5'](im, rect), 0))


def test_dlib_native_gets_the_exact_uint8_pixels():
    "A frame just under uint8 levels, with a decoder's overshoot on the face, is described as the rounded, clamped uint8 image (not truncated, not wrapped)."
    dlib = pytest.importorskip('dlib')
    from skimage.data import astronaut
    native = E.DlibNativeEmbedder(detect=False)
    u8 = astronaut().copy()
    x = torch.from_numpy((u8.astype(np.float32) - 0.4).clip(0, None)).permute(2, 0, 1)[None] / 255   # a decoder's output
    x[0, :, 200:260, 180:260] *= 1.3                                                                 # overshoot past 1 on the face
    want_u8 = (x[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy().copy()
    assert (x[0, :, 200:260, 180:260] > 1).any() and (want_u8[200:260, 180:260] == 255).any()
    rect = dlib.rectangle(*E.FFHQ_FACE_BOX)
    torch.testing.assert_close(native(x)[0], torch.tensor(_descriptor(native._m, want_u8, rect), dtype=torch.float32)
                               / np.linalg.norm(_descriptor(native._m, want_u8, rect)), atol=1e-6, rtol=0)


def test_dlib_native_takes_the_largest_detection():
    "With two faces in the frame, the larger is described, though dlib's detector lists the smaller first (it sorts by score, not size)."
    pytest.importorskip('dlib')
    import cv2
    from skimage.data import astronaut
    face = astronaut()[47:205, 143:301]                               # the astronaut's face with a margin, 158²
    canvas = np.full((512, 512, 3), 128, np.uint8)
    canvas[100:400, 0:300] = cv2.resize(face, (300, 300)); canvas[20:210, 315:505] = cv2.resize(face, (190, 190))
    native = E.DlibNativeEmbedder(detect=True)
    dets = list(native._m['det'](canvas, 0))
    assert len(dets) == 2 and dets[0].area() < dets[1].area()       # the premise: the small face comes first
    v = native(torch.from_numpy(canvas).permute(2, 0, 1)[None].float() / 255)[0].numpy()
    big, small = (_descriptor(native._m, canvas, r) for r in (dets[1], dets[0]))
    np.testing.assert_allclose(v, big / np.linalg.norm(big), atol=1e-6)
    assert not np.allclose(v, small / np.linalg.norm(small), atol=1e-3)


def test_dlib_native_fingerprint_follows_detect():
    "detect=True and detect=False describe other boxes, so other vectors: the cache key differs."
    pytest.importorskip('dlib')
    assert E.DlibNativeEmbedder(detect=True).fingerprint() != E.DlibNativeEmbedder(detect=False).fingerprint()


# ---------------------------------------------------------------- demo faces and photos

def test_detect_and_align_rect_is_dlibs_inclusive_rectangle():
    "DemoFace.rect is the rectangle dlib's HOG detector returns (inclusive right/bottom), so dlib's models can take it back."
    dlib = pytest.importorskip('dlib')
    import cv2
    from skimage.data import astronaut
    img = astronaut()                                               # 512²: detected at full size
    f = E.detect_and_align(img, 'astronaut')
    rects = dlib.get_frontal_face_detector()(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), 1)
    r = max(rects, key=lambda r: r.area())
    assert f.rect == (r.left(), r.top(), r.right(), r.bottom())


def test_demo_faces_label_numbered_photos_as_one_person(monkeypatch, tmp_path):
    "obama.jpg, obama2.jpg and obama3.jpg are the person 'obama' (the same-person checks rely on it); biden is biden."
    from PIL import Image
    paths = {}
    for n in E.FR_IMAGES:
        paths[n] = tmp_path / n; Image.new('RGB', (8, 8)).save(paths[n])
    monkeypatch.setattr(E, 'fetch_face_recognition_images', lambda: paths)
    monkeypatch.setattr(E, 'detect_and_align', lambda img, name, person, size: (name, person))
    got = dict(E.demo_faces(fetch=True, video_frames=0))
    assert got == {'astronaut': 'collins', 'grace_hopper': 'hopper', 'obama': 'obama', 'obama2': 'obama', 'obama3': 'obama', 'biden': 'biden'}


def test_photos_are_downloaded_when_any_is_missing(tmp_path, monkeypatch):
    "One cached photo of four is not the set: the download runs (here it fails, a UserError), the missing paths are not returned."
    d = tmp_path / 'face_recognition_images'; d.mkdir()
    (d / 'obama.jpg').write_bytes(b'jpg')
    import subprocess as sp
    monkeypatch.setattr(E.subprocess, 'run', lambda *a, **k: sp.CompletedProcess(a, 1, '', 'ERROR: no network here'))
    with pytest.raises(UserError, match='no network here'): E.fetch_face_recognition_images(tmp_path)


def test_cached_photos_are_marked_used(tmp_path, monkeypatch):
    "Taking the cached photos refreshes their modification time (`ipfacediff cache --older-than` counts from the last use)."
    d = tmp_path / 'face_recognition_images'; d.mkdir()
    old = time.time() - 30 * 86400
    for n in E.FR_IMAGES:
        (d / n).write_bytes(b'jpg'); os.utime(d / n, (old, old))
    monkeypatch.setattr(E.subprocess, 'run', lambda *a, **k: pytest.fail('nothing to download'))
    paths = E.fetch_face_recognition_images(tmp_path)
    assert set(paths) == set(E.FR_IMAGES) and all(p.stat().st_mtime > old + 86400 for p in paths.values())
