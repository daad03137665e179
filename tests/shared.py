"Helpers that several test files use: a two-person scene made from the sample clip, and the one-line `UserError` check."
import cv2, numpy as np, pytest
from ipfacediff.utils import UserError

def two_faces(f, hide=False):
    "`f` on the left of a grey 1280×360 frame (face ~260 px), a 0.6× copy on the right (~155 px); `hide`: big face blurred."
    g = np.full((360, 1280, 3), 128, np.uint8); g[:, :640] = f
    g[72:288, 760:1144] = cv2.resize(f, (384, 216), interpolation=cv2.INTER_AREA)
    if hide: g[60:, 320:620] = cv2.GaussianBlur(g[60:, 320:620], (0, 0), 25)
    return g

def two_branches(n_frames: int, prompt: str) -> dict:
    "Tiny ε1 (seed 0) and ε2 (seed 1) UNets, the source and [negative | prompt] embeddings, and `n_frames` source and edit latents at 16²."
    import torch
    from ipfacediff.models import encode_prompt, tiny_components
    c1, c2 = tiny_components(0), tiny_components(1)
    g = torch.Generator().manual_seed(0)
    return dict(eps1=c1.unet, eps2=c2.unet, c_src=encode_prompt(c1, ''), c_cfg=encode_prompt(c1, ['', prompt]),
                z_src=torch.randn(n_frames, 4, 16, 16, generator=g), z=torch.randn(n_frames, 4, 16, 16, generator=g))

def one_line_error(f, *parts):
    "Call `f`; it must raise a one-line `UserError` containing every string in `parts`; return the message."
    with pytest.raises(UserError) as e: f()
    msg = str(e.value)
    assert '\n' not in msg and all(p in msg for p in parts), msg
    return msg
