"The install pulled the CPU torch pinned in settings.ini, no CUDA packages and no torchvision."
import configparser, importlib.metadata as md
from pathlib import Path
import torch

def test_cpu_torch_only():
    names = {d.metadata['Name'].lower() for d in md.distributions()}
    assert 'torchvision' not in names
    assert not [n for n in names if n.startswith(('nvidia-', 'triton'))], 'a CUDA build of torch was pulled in'
    assert torch.__version__.startswith('2.13.0')

def test_requirements_pinned_and_installed():
    cfg = configparser.ConfigParser(delimiters=['=']); cfg.read(Path(__file__).parents[1] / 'settings.ini')
    for req in cfg['DEFAULT']['requirements'].split():
        name, ver = req.split('==')
        assert md.version(name) == ver or md.version(name).startswith(ver + '+'), (name, md.version(name), ver)
