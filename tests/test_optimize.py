"""`IPFaceDiffPipeline.optimize` — channels-last memory and `torch.compile` of the blocks no attention processor or hook
touches — must not change the edit. The notebook's check of this (nbs/09_pipeline, `#| slow`) is skipped in CI; this is
its CPU twin, with the aot_eager backend: dynamo's capture and AOTAutograd's tracing, as on the GPU, without inductor's
C++ builds (inductor takes ~4 min here on the same clip). Tiny random models, offline."""
import numpy as np, pytest, torch
import torch._dynamo
from ipfacediff.pipeline import EditConfig, IPFaceDiffPipeline
from ipfacediff.injection import DEFAULT_CONV_LAYERS
from ipfacediff.utils import data_path
from ipfacediff.video import read_video

torch.set_num_threads(1)
CFG = EditConfig(prompt='add glasses', steps=3, inversion_steps=3, size=64, batch_size=3)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp('opt')
    frames = read_video(data_path('sample.mp4'), max_frames=6, progress=False)[0]
    plain = IPFaceDiffPipeline.tiny(0, progress=False, cache_dir=d / 'plain')
    torch._dynamo.reset()
    fast = IPFaceDiffPipeline.tiny(0, progress=False, cache_dir=d / 'fast').optimize(channels_last=True, compile='aot_eager')
    graphs0 = torch._dynamo.utils.counters['stats']['unique_graphs']
    r_fast = fast.edit(frames, CFG, fps=10)
    graphs = torch._dynamo.utils.counters['stats']['unique_graphs'] - graphs0
    torch._dynamo.reset()
    return plain.edit(frames, CFG, fps=10), r_fast, fast, graphs


def test_optimized_edit_matches_the_plain_one(runs):
    "Same crops within one grey level (float32 reassociation), the same UNet calls, the frame beyond the face untouched."
    plain, fast, _, _ = runs
    assert np.abs(plain.crops.astype(int) - fast.crops).max() <= 1
    assert np.abs(plain.frames.astype(int) - fast.frames).max() <= 1
    assert dict(plain.unet_calls) == dict(fast.unet_calls) and plain.span == fast.span


def test_optimize_compiles_and_leaves_the_hooked_blocks_alone(runs):
    "Compiled graphs did run; the resnet whose features ε1 hands to ε2 stays eager (its hook must fire); weights are channels-last."
    _, _, pipe, graphs = runs
    assert graphs > 0 and len(pipe.compiled) > 10
    assert not set(DEFAULT_CONV_LAYERS) & set(pipe.compiled)
    assert pipe.c.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipe.c.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
