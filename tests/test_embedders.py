"""Identity embedders (nbs/03a_embedders.ipynb): dlib's ResNet in PyTorch against dlib itself on real
faces, same person vs different people, gradients, the ArcFace/ONNX/TorchScript backends on random
weights, and the one-line errors for missing weights or packages."""
import importlib.util, warnings
import numpy as np, pytest, torch
from ipfacediff.utils import UserError
from ipfacediff import embedders as E

torch.set_num_threads(1)


def _x(faces):
    return torch.stack([torch.from_numpy(f.aligned).permute(2, 0, 1) for f in faces]).float() / 255


@pytest.fixture(scope='module')
def faces():
    "Offline stills always; Obama ×3 + Biden fetched from PyPI (cached) when reachable; 2 sample.mp4 frames if present."
    try: return E.demo_faces(fetch=True, video_frames=2)
    except UserError as e:
        warnings.warn(f'face_recognition test images unavailable, same-person checks use the sample clip only: {e}')
        return E.demo_faces(fetch=False, video_frames=2)


@pytest.fixture(scope='module')
def dlib_emb():
    return E.get_embedder('dlib')


def _dlib_ref(f):
    import dlib
    m = E._dlib_models()
    return m, m['sp5'](f.image, dlib.rectangle(*f.rect))


def test_port_matches_dlib_on_its_chip(faces, dlib_emb):
    import dlib
    for f in faces[:2]:                                   # astronaut, Grace Hopper: offline
        m, shape = _dlib_ref(f)
        chip = dlib.get_face_chip(f.image, shape, size=150, padding=0.25)
        ref = np.array(m['rec'].compute_face_descriptor(chip))
        with torch.no_grad():
            ours = dlib_emb.net(E.DlibResNet.preprocess(torch.from_numpy(chip).permute(2, 0, 1)[None] / 255.))[0].numpy()
        assert ours @ ref / np.linalg.norm(ours) / np.linalg.norm(ref) >= 0.999
        assert np.abs(ours - ref).max() < 1e-4


def test_aligned_path_close_to_dlib(faces, dlib_emb):
    X = _x(faces)
    with torch.no_grad(): e = dlib_emb(X)
    assert e.shape == (len(faces), 128) and torch.allclose(e.norm(dim=1), torch.ones(len(faces)), atol=1e-5)
    for f, v in zip(faces, e):
        m, shape = _dlib_ref(f)
        r = np.array(m['rec'].compute_face_descriptor(f.image, shape)); r /= np.linalg.norm(r)
        assert float(v.numpy() @ r) > 0.985, f.name
    n = E.get_embedder('dlib-native')(X[:2])
    assert (n * e[:2]).sum(1).min() > 0.985 and not n.requires_grad


def test_same_person_closer_than_different(faces, dlib_emb):
    persons = np.array([f.person for f in faces])
    same = (persons[:, None] == persons[None]) & ~np.eye(len(faces), dtype=bool)
    # data/sample.mp4 ships with the package, so two frames of one person are always there
    assert same.any() and (persons == persons[-1]).sum() >= 2, f'no two faces of one person: {persons.tolist()}'
    with torch.no_grad(): S = (dlib_emb(_x(faces)) @ dlib_emb(_x(faces)).T).numpy()
    diff = persons[:, None] != persons[None]
    assert S[same].min() > S[diff].max(), (S[same].min(), S[diff].max())


def test_gradients_reach_the_image(faces, dlib_emb):
    x = _x(faces[:2]).requires_grad_(True)
    with torch.no_grad(): target = dlib_emb(_x(faces[:2])).flip(0)
    loss = 1 - (dlib_emb(x) * target).sum(1).mean()
    loss.backward()
    assert x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    assert not any(p.requires_grad for p in dlib_emb.parameters())


def test_arcface_random_roundtrip_and_errors(tmp_path):
    torch.manual_seed(0)
    arc = E.ArcFaceEmbedder(model=E.IResNet(E.IRESNET_LAYERS['r18']))
    torch.save(arc.net.state_dict(), tmp_path / 'backbone.pth')
    arc2 = E.get_embedder(f"arcface={tmp_path / 'backbone.pth'}")
    x = torch.rand(2, 3, 256, 256, requires_grad=True)
    out = arc2(x)
    assert out.shape == (2, 512) and torch.allclose(out, arc(x), atol=1e-5)
    out.sum().backward(); assert x.grad.abs().sum() > 0
    with pytest.raises(UserError, match='weights=PATH'): E.get_embedder('arcface')
    with pytest.raises(UserError, match='not found'): E.get_embedder('arcface', weights=tmp_path / 'nope.pth')


@pytest.fixture(scope='module')
def scripted(tmp_path_factory):
    "A random iresnet-18 saved as TorchScript (stands in for FaceNet/CosFace/VGGFace weights)."
    p = tmp_path_factory.mktemp('ts') / 'm.pt'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)
        torch.jit.script(E.IResNet(E.IRESNET_LAYERS['r18']).eval()).save(str(p))
    return p


@pytest.mark.parametrize('name', ['facenet', 'cosface', 'vggface'])
def test_table1_recognizers_need_a_file(name, scripted):
    with pytest.raises(UserError, match='weights=PATH') as ei: E.get_embedder(name)
    assert '\n' not in str(ei.value)
    crop = E.AlignedCrop(112, 3.0, (255.5, 270.0))
    e = E.get_embedder(name, weights=scripted, crop=crop)
    assert e.name == name and e.dim == 512 and e(torch.rand(1, 3, 128, 128)).shape == (1, 512)


def test_onnx_backend(tmp_path):
    with pytest.raises(UserError, match='onnx'): E.get_embedder('insightface-onnx', weights=tmp_path / 'missing.onnx')
    if importlib.util.find_spec('onnxruntime') is None or importlib.util.find_spec('onnx') is None:
        pytest.skip('onnxruntime and onnx (for torch.onnx.export) are needed for the export round trip')
    torch.manual_seed(0)
    arc = E.ArcFaceEmbedder(model=E.IResNet(E.IRESNET_LAYERS['r18']))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(arc.net, (torch.zeros(1, 3, 112, 112),), str(tmp_path / 'r.onnx'), dynamo=False,
                          input_names=['data'], output_names=['emb'], dynamic_axes={'data': {0: 'n'}})
    ox = E.get_embedder('insightface-onnx', weights=tmp_path / 'r.onnx')
    x = torch.rand(3, 3, 512, 512)
    assert not ox.differentiable and torch.allclose(ox(x), arc(x), atol=1e-4)


def test_bad_input_and_names():
    e = E.get_embedder('dlib')
    with pytest.raises(UserError, match='square'): e(torch.rand(1, 3, 512, 300))
    with pytest.raises(UserError, match='255'): e(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(UserError, match='use one of'): E.get_embedder('sphereface')
    with pytest.raises(UserError, match='face-recognition-models'): E.get_embedder('dlib', weights='/nonexistent.dat')
