"""The GPU's default path, run on the CPU: the whole edit in float16 and bfloat16 with ε1 and ε2 as two LoRA adapters of one
UNet (one batched forward for both). These machines have no GPU, so this is where a dtype slip in that path (a half tensor
meeting a float32 one, the DDIM state rounded to half, an adapter cast away) shows: the half-precision edit must run, keep
the budget, and land near the float32 edit of the same weights. Tiny random models, offline."""
import copy
import numpy as np, pytest, torch
from peft import LoraConfig, get_peft_model
from ipfacediff.models import tiny_components
from ipfacediff.pipeline import EditConfig, IPFaceDiffPipeline, unet_budget
from ipfacediff.video import read_video
from ipfacediff.utils import data_path

torch.set_num_threads(1)
LORA = dict(r=4, lora_alpha=4, target_modules=['to_q', 'to_k', 'to_v', 'to_out.0'], init_lora_weights=False)
CFG = EditConfig(prompt='add glasses', steps=3, inversion_steps=3, size=64, batch_size=3)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp('half')
    base = tiny_components(0).unet
    for i, name in enumerate(('identity', 'edit')):
        with torch.random.fork_rng():
            torch.manual_seed(5 + i)
            get_peft_model(copy.deepcopy(base), LoraConfig(**LORA)).save_pretrained(d / name)
    frames = read_video(data_path("sample.mp4"), max_frames=6, progress=False)[0]
    return d, frames


def _edit(setup, dtype):
    d, frames = setup
    p = IPFaceDiffPipeline.from_components(tiny_components(0).to('cpu', dtype), d / 'identity', d / 'edit', smoke=True,
                                           progress=False, cache_dir=d / f'cache_{dtype}'.replace('torch.', ''))
    assert p.adapters is not None and p.eps1 is p.eps2, 'the two adapters should share one UNet'
    return p.edit(frames, CFG, fps=10)


@pytest.fixture(scope='module')
def full(setup): return _edit(setup, torch.float32)


@pytest.mark.parametrize('dtype, tol', [(torch.float16, 1.5), (torch.bfloat16, 5.0)])
def test_half_precision_edit_lands_near_float32(setup, full, dtype, tol):
    "fp16/bf16 crops within `tol` grey levels on average of the float32 edit, whose own change to the crops is over 10× larger."
    r = _edit(setup, dtype)
    assert r.crops.shape == full.crops.shape and r.frames.shape == full.frames.shape
    np.testing.assert_array_equal(r.source_crops, full.source_crops)          # the crops cut before the networks run
    change = np.abs(full.crops.astype(float) - full.source_crops).mean()
    err = np.abs(r.crops.astype(float) - full.crops).mean()
    assert err < tol < change / 10, (err, change)
    assert dict(r.unet_calls) == {k: v for k, v in unet_budget(len(r.crops), CFG).items() if v}
    frames = setup[1]
    for i, q in enumerate(full.track.quads):                                   # beyond the crop's box, the input bit for bit
        (x0, y0), (x1, y1) = np.floor(q.min(0)).astype(int) - 1, np.ceil(q.max(0)).astype(int) + 1
        away = np.ones(frames.shape[1:3], bool); away[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1] = False
        assert away.mean() > 0.3 and (r.frames[i][away] == frames[i][away]).all(), i
